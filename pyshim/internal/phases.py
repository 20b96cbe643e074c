"""Where an operation's time goes, phase by phase, for the logs (the benchmarks read them)."""
from __future__ import annotations

import time


class PhaseTimer:
    """Milliseconds spent in each phase: mark(name) closes the phase that ran since the last mark."""

    def __init__(self):
        self._last = time.perf_counter()
        self._phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self._phases[phase] = round((now - self._last) * 1000, 2)
        self._last = now

    def add(self, phase: str, ms: float) -> None:
        """A phase measured elsewhere (e.g. inside another process's run), beside the marked ones."""
        self._phases[phase] = round(ms, 2)

    def report(self) -> dict[str, float]:
        return dict(self._phases)
