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
