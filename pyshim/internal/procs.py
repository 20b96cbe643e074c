"""Facts about host processes that recovery needs: is a pid still the process we think, and since when."""
from __future__ import annotations

import os
import signal
from pathlib import Path

from criu_glue.procfs import process_argv

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _boot_time_s() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    raise OSError("no btime in /proc/stat")


def start_time_ns(pid: int) -> int:
    """When the process started (wall clock, ns); 0 when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # The command name may hold spaces and parentheses: the fields start after the last ')'.
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return (_boot_time_s() * _CLOCK_TICKS + ticks) * 1_000_000_000 // _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return 0


def read_pidfile(path: Path) -> int:
    try:
        return int(Path(path).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def is_conmon_of(pid: int, container_id: str) -> bool:
    """True if `pid` is alive and is the conmon monitoring `container_id` (not a reused pid)."""
    argv = process_argv(pid)
    return argv is not None and argv[0].endswith(b"conmon") and container_id.encode() in argv


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
