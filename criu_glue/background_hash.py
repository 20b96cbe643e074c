"""sha256 of a stream of chunks, or of a file as it is written, computed in a thread of its own.

hashlib releases the GIL while it hashes a large buffer, so a writer (the archive on the source, the
receiver on the target) reads and writes its next chunk while this one is hashed: at ~1.5 GB/s the
hash alone costs about 170 ms per 256 MiB, which would otherwise add to every pass over the bytes.
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading

BACKLOG = 64  # chunks handed over but not hashed yet (the writer waits beyond that)
READ_CHUNK = 16 << 20  # a file being hashed is read back this much at a time, into one reused buffer


class BackgroundHash:
    """update() hands a chunk over (it must not change afterwards: bytes are copied if need be), or
    update_from_file() a range of a file; hexdigest() waits for the thread and ends it. close() ends it
    without a result."""

    def __init__(self, backlog: int = BACKLOG):
        self._hash = hashlib.sha256()
        self._chunks: queue.Queue = queue.Queue(maxsize=backlog)
        self._digest: str | None = None
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="background-sha256", daemon=True)
        self._thread.start()

    def update(self, chunk) -> None:
        if self._digest is not None:
            raise ValueError("update() after hexdigest()")
        self._chunks.put(chunk if isinstance(chunk, bytes) else bytes(chunk))

    def update_from_file(self, fd: int, offset: int, length: int) -> None:
        """The next `length` bytes are those of the file `fd` from `offset` (written there without passing
        through Python); the thread reads them back, from the page cache, in their turn. The file's range
        must not change afterwards; `fd` (a regular file, maybe open for writing only) may be closed at
        once: the thread reads the same file through a read-only descriptor of its own."""
        if self._digest is not None:
            raise ValueError("update_from_file() after hexdigest()")
        if length:
            self._chunks.put((os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC), offset, length))

    def hexdigest(self) -> str:
        """OSError if a file range could not be read back whole."""
        if self._digest is None:
            self._chunks.put(None)
            self._thread.join()
            if self._error is not None:
                raise self._error
            self._digest = self._hash.hexdigest()
        return self._digest

    def close(self) -> None:
        try:
            self.hexdigest()
        except OSError:
            pass  # closing without a result

    def _run(self) -> None:
        buffer = None
        while (chunk := self._chunks.get()) is not None:
            if not isinstance(chunk, tuple):
                self._hash.update(chunk)
                continue
            fd, offset, length = chunk
            try:
                if self._error is None:
                    buffer = buffer or memoryview(bytearray(READ_CHUNK))
                    self._hash_range(fd, offset, length, buffer)
            except OSError as e:
                self._error = e
            finally:
                os.close(fd)

    def _hash_range(self, fd: int, offset: int, length: int, buffer: memoryview) -> None:
        end = offset + length
        while offset < end:
            n = os.preadv(fd, [buffer[:min(len(buffer), end - offset)]], offset)
            if n == 0:
                raise OSError(f"the file range to hash ended at byte {offset} of {end}")
            self._hash.update(buffer[:n])
            offset += n



class GrowingFileHash:
    """sha256 of a file being written, read back by a thread of its own as it grows.

    For a writer whose bytes never pass through Python (a plain archive's members are copied by the
    kernel): it tells how far the file is complete (written()), the thread reads that much with pread
    into one reused buffer (no allocation, no page faults per chunk) and hashes it. Both calls release
    the GIL, and the pages were just written, so the read comes from the page cache. The digest is of
    the bytes in the file, as any later reader of it sees them. `fd` must be open for reading; its
    file position is not used."""

    def __init__(self, fd: int, chunk: int = READ_CHUNK):
        self._fd = fd
        self._chunk = chunk
        self._hash = hashlib.sha256()
        self._ready = 0       # bytes of the file that are complete (the writer says so)
        self._hashed = 0
        self._ended = False   # no more written() calls: hash up to _ready and stop
        self._abandoned = False  # stop at once, no digest wanted
        self._error: BaseException | None = None
        self._digest: str | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="file-sha256", daemon=True)
        self._thread.start()

    def written(self, size: int) -> None:
        """The file's first `size` bytes are complete and will not change."""
        with self._changed:
            if size > self._ready:
                self._ready = size
                self._changed.notify()

    def hexdigest(self, size: int) -> str:
        """The digest of the file's first `size` bytes (its whole content: the writer is done); waits for
        the thread. OSError if the file could not be read that far."""
        if self._digest is None:
            self.written(size)
            self._stop()
            if self._error is not None:
                raise self._error
            if self._hashed != size:
                raise OSError(f"the file being hashed ended at byte {self._hashed} of {size}")
            self._digest = self._hash.hexdigest()
        return self._digest

    def close(self) -> None:
        """End the thread without a result (the writer failed)."""
        self._abandoned = True
        self._stop()

    def _stop(self) -> None:
        with self._changed:
            self._ended = True
            self._changed.notify()
        self._thread.join()

    def _run(self) -> None:
        buffer = memoryview(bytearray(self._chunk))
        try:
            while True:
                with self._changed:
                    while self._hashed >= self._ready and not self._ended:
                        self._changed.wait()
                    ready = self._ready
                    if self._hashed >= ready or self._abandoned:
                        return  # ended, and everything written is hashed (or nothing more is wanted)
                while self._hashed < ready and not self._abandoned:
                    n = os.preadv(self._fd, [buffer[:min(self._chunk, ready - self._hashed)]], self._hashed)
                    if n == 0:
                        return  # shorter than the writer said: hexdigest() reports it
                    self._hash.update(buffer[:n])
                    self._hashed += n
        except BaseException as e:  # noqa: BLE001 - handed to the caller by hexdigest()
            self._error = e
