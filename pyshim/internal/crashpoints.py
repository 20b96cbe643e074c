"""Deterministic crash injection, for the fault-injection tests only.

`PYSHIM_CRASH_AT=<name>` makes the daemon SIGKILL itself the first time it reaches the crash point
`<name>` (`<name>#N`: the N-th time). Every step announced in the intent journal is a crash point
named `<operation>:<step>` (pyshim/internal/intents.py); code may add others with `reached()`.
A kill of ourselves is exactly what an OOM kill or a node hiccup does: no finally block runs.

Unset (always, outside the tests) it costs one string comparison.
"""
from __future__ import annotations

import os
import signal
import threading

ENV = "PYSHIM_CRASH_AT"

_lock = threading.Lock()
_hits: dict[str, int] = {}


def _target() -> tuple[str, int]:
    spec = os.environ.get(ENV, "")
    name, _, nth = spec.partition("#")
    return name, int(nth) if nth.isdigit() and int(nth) > 0 else 1


def reached(name: str) -> None:
    wanted, nth = _target()
    if not wanted or wanted != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] != nth:
            return
    os.kill(os.getpid(), signal.SIGKILL)
