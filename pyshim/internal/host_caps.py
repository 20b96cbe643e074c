"""What this host lets the daemon (and so runc and its init) do: capabilities, kernel features."""
from __future__ import annotations

import functools
import os

CAP_SYS_RESOURCE = 24


@functools.lru_cache(maxsize=None)
def effective_capabilities() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def can_lower_oom_score_adj() -> bool:
    """Lowering oom_score_adj below 0 needs CAP_SYS_RESOURCE; without it runc's init dies mid-create
    and runc reports only "can't get final child's PID from pipe: EOF"."""
    return bool(effective_capabilities() & (1 << CAP_SYS_RESOURCE))


PIPE_MAX_SIZE_SYSCTL = "/proc/sys/fs/pipe-max-size"
# CRIU's lazy page server sizes the pipe it serves pages through to PIPE_MAX_SIZE (1024) pages of 4 KiB
# minus a margin (criu/page-pipe.c, ~3.3 MB) with F_SETPIPE_SZ, ignoring a failure: above fs.pipe-max-size
# and without CAP_SYS_RESOURCE the pipe is never made and the first page sent fails with EBADF
# ("page-pipe: splice: -1: Bad file descriptor"). 4 MiB covers it with the next power of two.
LAZY_PAGE_SERVER_PIPE_BYTES = 4 << 20


def pipe_max_size(path: str = PIPE_MAX_SIZE_SYSCTL) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def lazy_page_server_problem(capabilities: int | None = None, pipe_max: int | None = None) -> str:
    """Why CRIU's lazy page server (the source of `pyshim migrate --lazy`) cannot work here; "" if it can.
    pyshim never changes the sysctl itself: it is the host's, shared by everything on it."""
    caps = effective_capabilities() if capabilities is None else capabilities
    if caps & (1 << CAP_SYS_RESOURCE):
        return ""
    size = pipe_max_size() if pipe_max is None else pipe_max
    if size >= LAZY_PAGE_SERVER_PIPE_BYTES:
        return ""
    return (f"fs.pipe-max-size is {size} and pyshim lacks CAP_SYS_RESOURCE: CRIU's lazy page server needs "
            f"pipes of {LAZY_PAGE_SERVER_PIPE_BYTES} bytes (else its first page fails with EBADF); raise it "
            f"on this node with `sysctl -w fs.pipe-max-size={LAZY_PAGE_SERVER_PIPE_BYTES}`")


def kernel_at_least(major: int, minor: int, release: str | None = None) -> bool:
    """`uname -r` (e.g. "6.18.0-1-amd64") is at least major.minor."""
    numbers = (release or os.uname().release).split("-")[0].split(".")
    try:
        return (int(numbers[0]), int(numbers[1])) >= (major, minor)
    except (IndexError, ValueError):
        return False


def recursive_read_only_mounts(runc_mount_options: frozenset[str]) -> bool:
    """CRI Mount.recursive_read_only: runc applies "rro" with mount_setattr(2), new in Linux 5.12."""
    return "rro" in runc_mount_options and kernel_at_least(5, 12)
