"""Single-use, expiring, unguessable tokens for the streaming URLs (kubelet's requestCache)."""
from __future__ import annotations

import secrets
import threading
import time
from typing import Any, Callable

# What kubelet's streaming server allows in flight (requestCache maxInFlight).
MAX_IN_FLIGHT = 1000


class TooManyRequests(Exception):
    pass


class TokenCache:
    def __init__(self, ttl: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_in_flight: int = MAX_IN_FLIGHT):
        self.ttl = ttl
        self._clock = clock
        self._max = max_in_flight
        self._entries: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def insert(self, request: Any) -> str:
        """Store a request; the token is what the URL carries (32 random bytes, URL-safe)."""
        with self._lock:
            self._expire()
            if len(self._entries) >= self._max:
                raise TooManyRequests(f"{self._max} streaming requests are already waiting for their client")
            token = secrets.token_urlsafe(32)
            self._entries[token] = (self._clock() + self.ttl, request)
            return token

    def consume(self, token: str) -> Any | None:
        """The request for `token`, once: None if it is unknown, used or expired."""
        with self._lock:
            entry = self._entries.pop(token, None)
            if entry is None:
                return None
            expires, request = entry
            return request if self._clock() < expires else None

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    def _expire(self) -> None:
        now = self._clock()
        for token in [t for t, (expires, _) in self._entries.items() if expires <= now]:
            del self._entries[token]
