"""Finding what pod sandboxes leave on the machine: the scans behind sandbox recovery and removal.

A daemon killed in the middle of RunPodSandbox, StopPodSandbox or RemovePodSandbox can leave
pieces that no record names: a pinned network namespace, a host-local IP allocation (and with it a
veth and portmap rules), a CNI cache entry, pod directories, an empty pod cgroup, or runc
containers still in a pod's cgroup. The functions here only look (and, for cgroups, empty
processes out); SandboxManager decides what to undo (pyshim/internal/sandbox_manager.py).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from oci.runtime_spec import ANNOTATION_SANDBOX_ID
from pyshim.internal import cgroups

log = logging.getLogger(__name__)

# host-local keeps these beside the one-file-per-IP allocations.
_HOST_LOCAL_BOOKKEEPING = ("lock",)
_HOST_LOCAL_LAST_RESERVED = "last_reserved_ip."
KILL_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class IPAllocation:
    """One host-local allocation file: `<data dir>/<network>/<ip>`, whose first line is the owner's id."""
    path: Path
    ip: str
    owner: str


def host_local_allocations(network_dir: Path) -> list[IPAllocation]:
    """The IPs host-local has handed out in one network's data directory, with their owners."""
    found = []
    try:
        entries = sorted(Path(network_dir).iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        if path.name in _HOST_LOCAL_BOOKKEEPING or path.name.startswith(_HOST_LOCAL_LAST_RESERVED):
            continue
        if not path.is_file():
            continue
        try:
            # host-local writes "<container id>\r\n<ifname>" (older versions: the id alone).
            owner = path.read_text(errors="replace").splitlines()[0].strip() if path.stat().st_size else ""
        except (OSError, IndexError):
            owner = ""
        found.append(IPAllocation(path=path, ip=path.name, owner=owner))
    return found


def netns_names_with_prefix(netns_dir: Path, prefix: str) -> list[str]:
    """Network namespace pins (or empty pin files a crash left) named with a daemon's prefix."""
    if not prefix:
        return []
    try:
        return sorted(p.name for p in Path(netns_dir).iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def child_dirs(directory: Path) -> list[str]:
    try:
        return sorted(p.name for p in Path(directory).iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def cgroup_children(cgroup_parent: str) -> set[str]:
    """Names of the cgroups directly under `cgroup_parent`, in any v1 hierarchy."""
    rel = cgroup_parent.strip("/")
    if not rel:
        return set()
    names: set[str] = set()
    for base in cgroups.CGROUP_ROOT.glob(f"*/{rel}"):
        names.update(child_dirs(base))
    return names


def cgroup_tree_processes(cgroup_path: str) -> list[int]:
    """Every process in a cgroup and its descendants (the freezer hierarchy holds all of a
    container's processes, and runc puts each container below its pod's cgroup)."""
    rel = cgroup_path.strip("/")
    if not rel:
        return []
    pids: set[int] = set()
    for hierarchy in ("freezer", "pids", "memory"):
        base = cgroups.CGROUP_ROOT / hierarchy / rel
        for dirpath, _dirnames, _files in os.walk(base):
            try:
                pids.update(int(w) for w in (Path(dirpath) / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
    return sorted(pids)


def kill_processes(pids: list[int]) -> list[int]:
    """SIGKILL `pids` and wait (bounded) until they are gone; returns those still alive."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        if alive:
            time.sleep(0.02)
    return alive


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return text[text.rindex(")") + 2:].split()[0] not in ("Z", "X")


def runc_containers_of_sandbox(runc_binary: str, runc_root: Path, sandbox_id: str) -> list[str]:
    """Ids of the runc containers (any state) whose OCI annotations name `sandbox_id` as their pod."""
    if not Path(runc_root).is_dir():
        return []
    proc = subprocess.run([runc_binary, "--root", str(runc_root), "list", "--format", "json"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"runc list in {runc_root} failed: {proc.stderr.decode(errors='replace').strip()}")
    entries = json.loads(proc.stdout or b"null") or []
    return sorted(e["id"] for e in entries
                  if (e.get("annotations") or {}).get(ANNOTATION_SANDBOX_ID) == sandbox_id)
