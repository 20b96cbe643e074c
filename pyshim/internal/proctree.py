"""Process trees on the host, read from /proc: what an exec started, to end all of it.

pyshim runs in the host PID namespace, so it sees a container's processes with their host pids.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> tuple[int, int] | None:
    """(ppid, session id) of a live process, None once it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[3])


def family(roots, sessions=()) -> set[int]:
    """The live `roots`, their descendants, and for a root that leads a session every process of
    that session (an orphan a descendant left behind keeps its session though it is reparented);
    also every process of the given `sessions` (ids of sessions whose leader may be gone)."""
    parents: dict[int, int] = {}
    session_of: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                parents[int(entry.name)], session_of[int(entry.name)] = fields
    members = {root for root in roots if root in parents}
    leaders = {root for root in members if session_of[root] == root} | set(sessions)
    members |= {pid for pid, sid in session_of.items() if sid in leaders}
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in members} - members
        members |= children
        grew = bool(children)
    return members


def kill_family(roots, sessions=()) -> set[int]:
    """SIGKILL the `roots` and their family (see family); returns the pids signalled.

    They are stopped first, again and again until no new member appears, so that none can fork a
    child between our look at the tree and the kill."""
    stopped: set[int] = set()
    while True:
        members = family(roots, sessions) | stopped
        new = members - stopped
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    return stopped


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
