"""A host process's command line, read from /proc: the one low-level reader that the library's
lazy-pages handling and the daemon's recovery (pyshim/internal/procs.py) share."""
from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def process_argv(pid: int, proc: Path = PROC) -> list[bytes] | None:
    """The argv of process `pid` (bytes, as the kernel keeps them), or None when there is no such
    process (or it is gone, or has no command line: a zombie or a kernel thread)."""
    if pid <= 0:
        return None
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    # Each argument ends in NUL (a process that rewrote its command line may leave none at the end).
    return (raw[:-1] if raw.endswith(b"\0") else raw).split(b"\0")


def live_pids(proc: Path = PROC) -> list[int]:
    """Every pid /proc lists now."""
    return [int(entry.name) for entry in proc.iterdir() if entry.name.isdigit()]
