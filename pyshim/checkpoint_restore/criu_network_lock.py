"""CRIU's network lock, lifted by pyshim when pyshim killed the CRIU that took it.

While CRIU dumps a process tree that lives in a network namespace other than its own, it locks
that namespace's whole network (criu/net.c, `network_lock`, iptables by default): a chain `CRIU`
that drops every packet but its own, jumped to from INPUT and OUTPUT, for IPv4 and IPv6. CRIU lifts
it when the dump ends, also when the dump fails. A CRIU killed mid-dump -- pyshim stops `runc
checkpoint` and its CRIU when the caller's deadline passes -- cannot, and the pod would drop every
packet from then on, although its containers run on thawed.

So pyshim lifts it, but only once no other dump of ours runs in that namespace: the containers of
one pod share it, and a dump still running (a second CheckpointContainer of the same pod, a pod
checkpoint's other parts) holds the lock for a reason. Dumps are counted per namespace while
`runc checkpoint` runs (`dumping`); a killed one is marked, and the last dump there to end lifts
the lock.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import subprocess
import threading
from typing import Iterator

from pyshim.checkpoint_restore import tcp_lock

log = logging.getLogger(__name__)

CHAIN = "CRIU"


def lift(netns_path: str) -> bool:
    """Remove CRIU's lock (both families) from the namespace; True if there was one. Idempotent."""
    return tcp_lock.remove_chains(netns_path, lambda chain: chain == CHAIN)


class CriuNetworkLocks:
    """Which network namespaces have a dump of ours running, and the lift after a killed one."""

    def __init__(self, lift_lock=lift):
        self._lift = lift_lock
        self._dumps: collections.Counter[str] = collections.Counter()
        self._killed: set[str] = set()  # namespaces where a killed dump left its lock
        self._mutex = threading.Lock()

    @contextlib.contextmanager
    def dumping(self, netns_path: str, container_id: str) -> Iterator["_Dump"]:
        """Around one `runc checkpoint` whose tree lives in `netns_path` ("" for the host's network:
        CRIU takes no lock there). Call `killed()` on what it yields when the dump was killed: the
        lock is lifted as the last dump of ours in that namespace ends."""
        dump = _Dump(self, netns_path)
        if not netns_path:
            yield dump
            return
        with self._mutex:
            self._dumps[netns_path] += 1
        try:
            yield dump
        finally:
            with self._mutex:
                self._dumps[netns_path] -= 1
                last = not self._dumps[netns_path]
                if last:
                    del self._dumps[netns_path]
                lift_now = last and netns_path in self._killed
                if lift_now:
                    self._killed.discard(netns_path)
                    self._lift_quietly(netns_path, container_id)

    def _mark_killed(self, netns_path: str) -> None:
        if netns_path:
            with self._mutex:
                self._killed.add(netns_path)

    def _lift_quietly(self, netns_path: str, container_id: str) -> None:
        """Never raises: the namespace may be gone with its pod, and the caller is reporting the
        deadline already."""
        try:
            lifted = self._lift(netns_path)
        except (OSError, subprocess.SubprocessError) as e:
            log.error("cannot lift CRIU's network lock after a killed dump; the pod may drop its packets",
                      extra={"container": container_id, "netns": netns_path, "error": str(e)})
            return
        if lifted:
            log.warning("lifted the network lock of a CRIU killed mid-dump",
                        extra={"container": container_id, "netns": netns_path})


class _Dump:
    def __init__(self, locks: CriuNetworkLocks, netns_path: str):
        self._locks, self._netns_path = locks, netns_path

    def killed(self) -> None:
        """This dump's CRIU was killed: its lock, if it took one, is still in place."""
        self._locks._mark_killed(self._netns_path)
