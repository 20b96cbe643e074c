"""Keep the TCP peers of a container stopped by a checkpoint from seeing it die, as CRIU's lock does.

`runc checkpoint` without --leave-running leaves CRIU's per-connection iptables lock in place while
the processes are killed, so their FIN/RST never leave the pod and the connections can be restored,
at the same address, as if nothing happened. pyshim dumps with --leave-running (so that a failed
archive can thaw the container instead), which lifts CRIU's lock; before killing the frozen
processes it locks their established connections itself, in the pod's network namespace, with one
chain per container. A restore with established connections into that namespace lifts the locks.
Host-network containers are not locked: the host's firewall is not ours to change.
"""
from __future__ import annotations

import ipaddress
import os
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CHAIN_PREFIX = "PYSHIM-LOCK-"
_ANY_CHAIN_RE = re.compile(r"^:(\S+) ", re.M)
_ESTABLISHED = "01"


class LockError(Exception):
    pass


@dataclass(frozen=True)
class Connection:
    local: str
    local_port: int
    peer: str
    peer_port: int

    @property
    def ipv6(self) -> bool:
        return ":" in self.local


def _socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(fd_dir / name)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _address(hex_addr: str) -> str:
    ip_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(ip_hex)
    # /proc/net/tcp* prints each 32-bit word in host (little-endian) order.
    words = struct.unpack(f"<{len(raw) // 4}I", raw)
    address = ipaddress.ip_address(struct.pack(f">{len(words)}I", *words))
    # A dual-stack socket's IPv4 peers show as ::ffff:a.b.c.d; on the wire they are IPv4 packets.
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address), int(port_hex, 16)


def established_connections(pids: list[int]) -> list[Connection]:
    """The established TCP connections whose sockets the given processes hold."""
    if not pids:
        return []
    inodes = _socket_inodes(pids)
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pids[0]}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _ESTABLISHED and fields[9] in inodes:
                (local, lport), (peer, pport) = _address(fields[1]), _address(fields[2])
                found.append(Connection(local, lport, peer, pport))
    return found


def chain_name(container_id: str) -> str:
    return CHAIN_PREFIX + container_id[:12]


def _rules(chain: str, connections: list[Connection]) -> str:
    lines = ["*filter", f":{chain} - [0:0]"]
    for c in connections:
        lines.append(f"-A {chain} -p tcp -s {c.peer} --sport {c.peer_port} -d {c.local} --dport {c.local_port} -j DROP")
        lines.append(f"-A {chain} -p tcp -s {c.local} --sport {c.local_port} -d {c.peer} --dport {c.peer_port} -j DROP")
    lines += [f"-I INPUT -j {chain}", f"-I OUTPUT -j {chain}", "COMMIT", ""]
    return "\n".join(lines)


def _in_netns(netns_path: str, argv: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net={netns_path}", "--", *argv], input=stdin, capture_output=True,
                          text=True, timeout=30)


def lock(netns_path: str, container_id: str, connections: list[Connection]) -> None:
    """Drop every packet of these connections, both ways, in the pod's network namespace."""
    for family, tool in ((False, "iptables-restore"), (True, "ip6tables-restore")):
        chosen = [c for c in connections if c.ipv6 == family]
        if not chosen:
            continue
        proc = _in_netns(netns_path, [tool, "-w", "--noflush"], _rules(chain_name(container_id), chosen))
        if proc.returncode != 0:
            raise LockError(f"{tool} in {netns_path}: {proc.stderr.strip()}")


def unlock_all(netns_path: str, container_id: str = "") -> None:
    """Lift every checkpoint lock in the namespace (before restoring connections into it), or only
    the one container's (when its stop failed and it runs on)."""
    only = chain_name(container_id) if container_id else None
    remove_chains(netns_path, lambda chain: chain.startswith(CHAIN_PREFIX) and (only is None or chain == only))


# One jump per lock that was taken: two CRIUs dumping side by side in one namespace insert one each.
_MAX_JUMPS = 64


def remove_chains(netns_path: str, wanted: Callable[[str], bool]) -> bool:
    """Remove the filter chains `wanted` names (both families) and their jumps from INPUT and OUTPUT,
    in the namespace; True if there was one. Idempotent."""
    found = False
    for save, tool in (("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")):
        proc = _in_netns(netns_path, [save, "-t", "filter"])
        if proc.returncode != 0:
            continue
        for chain in _ANY_CHAIN_RE.findall(proc.stdout):
            if not wanted(chain):
                continue
            found = True
            for hook in ("INPUT", "OUTPUT"):
                for _ in range(_MAX_JUMPS):
                    if _in_netns(netns_path, [tool, "-w", "-D", hook, "-j", chain]).returncode != 0:
                        break
            _in_netns(netns_path, [tool, "-w", "-F", chain])
            _in_netns(netns_path, [tool, "-w", "-X", chain])
    return found
