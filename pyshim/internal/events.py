"""Container lifecycle events for GetContainerEvents: every subscriber gets every event, in order."""
from __future__ import annotations

import enum
import queue
import threading
from dataclasses import dataclass


class EventType(enum.IntEnum):
    # Values are the CRI ContainerEventType numbers.
    CREATED = 0
    STARTED = 1
    STOPPED = 2
    DELETED = 3


@dataclass(frozen=True)
class ContainerEvent:
    container_id: str
    sandbox_id: str
    type: EventType
    created_at_ns: int


class EventBus:
    # A slow client must not grow memory without bound; it loses the oldest events instead.
    MAX_QUEUED = 1000

    def __init__(self):
        self._subscribers: list[queue.Queue] = []
        self._lock = threading.Lock()

    def publish(self, event: ContainerEvent) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            while True:
                try:
                    q.put_nowait(event)
                    break
                except queue.Full:
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(self.MAX_QUEUED)
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)
