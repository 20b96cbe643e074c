"""Reading container and pod usage from cgroup v1 (this machine runs the hybrid layout, no systemd)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "hugetlb",
                "net_cls", "net_prio", "perf_event", "systemd",
                "unified")  # hybrid layout: runc makes each container's cgroup in the v2 tree too


@dataclass(frozen=True)
class Usage:
    timestamp_ns: int
    cpu_usage_ns: int
    memory_usage_bytes: int
    memory_working_set_bytes: int
    memory_rss_bytes: int
    page_faults: int
    major_page_faults: int
    pids: int


def _read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _memory_stat(path: Path) -> dict[str, int]:
    stats = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            stats[key] = int(value)
    except (OSError, ValueError):
        pass
    return stats


def usage(cgroups_path: str) -> Usage | None:
    """Usage of the cgroup at `cgroups_path` (e.g. /pyshim/<pod>/<ctr>); None when it does not exist."""
    rel = cgroups_path.lstrip("/")
    memory_dir = CGROUP_ROOT / "memory" / rel
    cpu_dir = CGROUP_ROOT / "cpuacct" / rel
    if not memory_dir.is_dir() and not cpu_dir.is_dir():
        return None
    stat = _memory_stat(memory_dir / "memory.stat")
    mem_usage = _read_int(memory_dir / "memory.usage_in_bytes")
    # kubelet's working set: usage minus inactive file cache (what eviction decisions use).
    working_set = max(0, mem_usage - stat.get("total_inactive_file", 0))
    return Usage(
        timestamp_ns=time.time_ns(),
        cpu_usage_ns=_read_int(cpu_dir / "cpuacct.usage"),
        memory_usage_bytes=mem_usage,
        memory_working_set_bytes=working_set,
        memory_rss_bytes=stat.get("total_rss", 0),
        page_faults=stat.get("total_pgfault", 0),
        major_page_faults=stat.get("total_pgmajfault", 0),
        pids=_read_int(CGROUP_ROOT / "pids" / rel / "pids.current"),
    )


def remove(cgroups_path: str) -> None:
    """Remove a (pod) cgroup from every v1 hierarchy, leaves first. Empty cgroups only: rmdir refuses others."""
    rel = cgroups_path.strip("/")
    if not rel:
        return
    for controller in _CONTROLLERS:
        base = CGROUP_ROOT / controller / rel
        if not base.is_dir():
            continue
        for dirpath, dirnames, _ in sorted(os.walk(base), key=lambda t: -t[0].count("/")):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


def processes(cgroups_path: str) -> list[int]:
    """Host PIDs of every process in a container's cgroup (the freezer hierarchy holds them all)."""
    try:
        text = (CGROUP_ROOT / "freezer" / cgroups_path.strip("/") / "cgroup.procs").read_text()
    except OSError:
        return []
    return [int(word) for word in text.split()]


def freezer_state(cgroups_path: str) -> str:
    """THAWED, FREEZING or FROZEN; "" when the container has no freezer cgroup."""
    try:
        return (CGROUP_ROOT / "freezer" / cgroups_path.strip("/") / "freezer.state").read_text().strip()
    except OSError:
        return ""


def thaw(cgroups_path: str) -> None:
    """Thaw a freezer cgroup behind runc's back: only for one runc no longer knows (after a crash)."""
    (CGROUP_ROOT / "freezer" / cgroups_path.strip("/") / "freezer.state").write_text("THAWED")
