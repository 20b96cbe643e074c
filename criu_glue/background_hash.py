"""sha256 of a stream of chunks, computed in a thread of its own.

hashlib releases the GIL while it hashes a large buffer, so a writer (the archive on the source, the
receiver on the target) reads and writes its next chunk while this one is hashed: at ~1.5 GB/s the
hash alone costs about 170 ms per 256 MiB, which would otherwise add to every pass over the bytes.
"""
from __future__ import annotations

import hashlib
import queue
import threading

BACKLOG = 64  # chunks handed over but not hashed yet (the writer waits beyond that)


class BackgroundHash:
    """update() hands a chunk over (it must not change afterwards: bytes are copied if need be);
    hexdigest() waits for the thread and ends it. close() ends it without a result."""

    def __init__(self, backlog: int = BACKLOG):
        self._hash = hashlib.sha256()
        self._chunks: queue.Queue = queue.Queue(maxsize=backlog)
        self._digest: str | None = None
        self._thread = threading.Thread(target=self._run, name="background-sha256", daemon=True)
        self._thread.start()

    def update(self, chunk) -> None:
        if self._digest is not None:
            raise ValueError("update() after hexdigest()")
        self._chunks.put(chunk if isinstance(chunk, bytes) else bytes(chunk))

    def hexdigest(self) -> str:
        if self._digest is None:
            self._chunks.put(None)
            self._thread.join()
            self._digest = self._hash.hexdigest()
        return self._digest

    def close(self) -> None:
        self.hexdigest()

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._hash.update(chunk)
