"""What this host lets the daemon (and so runc's init) do, read once from /proc/self/status."""
from __future__ import annotations

import functools

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
