"""A checkpoint archive streamed while it is being written: the framing of `pyshim migrate --direct`.

The source node sends the archive's bytes as the source daemon writes them, so the transfer overlaps
the archive's writing; the digest and size the daemon computed are known only once the last byte is
written, so they come after the bytes, in a trailer, and the receiver checks them against what it
counted and hashed itself before anything it stored is used.

On the wire (the receiver's stdin):

    {"format": "pyshim-archive-frames/1", "tag": "NAME:TAG"}\\n      one JSON line, sent first
    <u32 big-endian N> <N archive bytes>                              repeated, N > 0
    <u32 0>                                                           end of the archive's bytes
    {"digest": "sha256:...", "diffId": "sha256:...", "size": N}\\n    the trailer, one JSON line

Anything else -- the stream ending before the trailer (the sender gave up, the checkpoint failed,
the connection broke), a frame beyond the size budget, a trailer that is not well formed or does not
match the bytes -- is a FramingError: the receiver keeps nothing.
"""
from __future__ import annotations

import json
import os
import struct
from typing import BinaryIO

from .archive import ArchiveDigest
from .background_hash import BackgroundHash
from .errors import ArchiveError
from .splice_copy import Splicer

FORMAT = "pyshim-archive-frames/1"
MAX_FRAME = 8 << 20  # what a sender puts in one frame at most; a larger announced frame is refused
_LENGTH = struct.Struct(">I")
_MAX_LINE = 4096


class FramingError(ArchiveError):
    """The framed stream is cut, malformed, too large, or its trailer does not match its bytes."""


# ---------------------------------------------------------------- writing (the source node)

class FrameWriter:
    """Writes the framing to `sink` (a pipe or socket fd): header, frames, trailer."""

    def __init__(self, sink_fd: int):
        self._fd = sink_fd
        self.sent = 0

    def header(self, tag: str) -> None:
        self._write(json.dumps({"format": FORMAT, "tag": tag}).encode() + b"\n")

    def frames_from_file(self, source_fd: int, offset: int, count: int) -> int:
        """Send `count` bytes of the file `source_fd` from `offset` as frames (sendfile(2): the bytes
        never pass through this process); returns how many were sent (less only at the file's end)."""
        done = 0
        while done < count:
            n = min(count - done, MAX_FRAME)
            self._write(_LENGTH.pack(n))
            sent = 0
            while sent < n:
                k = os.sendfile(self._fd, source_fd, offset + done + sent, n - sent)
                if k == 0:  # the file is shorter than it said: the frame cannot be completed
                    raise FramingError(f"the archive ended at byte {offset + done + sent} while "
                                       f"{n - sent} more were announced")
                sent += k
            done += n
            self.sent += n
        return done

    def trailer(self, written: ArchiveDigest) -> None:
        self._write(_LENGTH.pack(0) + json.dumps(written.to_json()).encode() + b"\n")

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]


# ---------------------------------------------------------------- reading (the target node)

def read_header(stream: BinaryIO) -> str:
    """The header line; returns the tag. FramingError if the sender gave up before it."""
    line = stream.readline(_MAX_LINE)
    if not line:
        raise FramingError("no archive came: the stream ended before its header (the sender gave up)")
    try:
        header = json.loads(line)
    except ValueError:
        raise FramingError("the stream's header line is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FramingError(f"the stream's header does not announce {FORMAT}")
    tag = header.get("tag")
    if not isinstance(tag, str) or not tag:
        raise FramingError("the stream's header names no tag")
    return tag


class FrameReader:
    """The archive's bytes out of the frames on `stream`, as a file-like read().

    It counts, and unless `hashing` is False hashes, what it hands out. The read that reaches the end
    parses the trailer and raises FramingError unless it matches those figures, so a consumer fails
    before it can commit anything of a stream that was cut or differs. A consumer that hashes the bytes
    itself (the image store writing the blob) passes hashing=False and must compare the trailer's
    digest with its own. `max_bytes` bounds the archive (e.g. the free space)."""

    def __init__(self, stream: BinaryIO, max_bytes: int, hashing: bool = True):
        self._stream = stream
        self._max = max_bytes
        self._left = 0  # bytes left in the current frame
        self._hash = BackgroundHash() if hashing else None
        # An unbuffered pipe or socket (the receiver's stdin): bytes may be moved into files in the kernel.
        self._splicer = Splicer.for_stream(stream) if hashing else None
        self.size = 0
        self.trailer: ArchiveDigest | None = None

    def read(self, size: int = -1) -> bytes:
        if not self._in_frame():
            return b""
        want = self._left if size is None or size < 0 else min(size, self._left)
        chunk = self._stream.read(want)
        self._count(len(chunk) if chunk else 0)
        if self._hash is not None:
            self._hash.update(chunk)
        return chunk

    def move_into(self, fd: int, count: int) -> int:
        """Like read(count), but the bytes are appended to the file `fd` at its position (and hashed from
        there), in the kernel when the stream allows it (splice_copy), else through read(). Returns how
        many, 0 at the end (the trailer checked)."""
        if self._splicer is None:
            chunk = self.read(count)
            _write_all(fd, chunk)
            return len(chunk)
        if not self._in_frame():
            return 0
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        n = self._splicer.move(fd, min(count, self._left))
        self._count(n)
        self._hash.update_from_file(fd, offset, n)
        return n

    def close(self) -> None:
        """Stop the hashing thread of a stream abandoned before its end."""
        if self._hash is not None:
            self._hash.close()
        if self._splicer is not None:
            self._splicer.close()

    def _in_frame(self) -> bool:
        """Whether archive bytes follow (the next frame started if need be); False once the trailer was
        read and checked."""
        if self.trailer is not None:
            return False
        if self._left == 0:
            self._left = self._next_frame_length()
            if self._left == 0:
                self.trailer = self._read_trailer()
                return False
        return True

    def _count(self, n: int) -> None:
        if n == 0:
            raise FramingError(f"the stream was cut after {self.size} bytes of the archive, inside a frame")
        self._left -= n
        self.size += n

    def _read_exactly(self, n: int) -> bytes:
        """n bytes, fewer only at the stream's end (an unbuffered stream returns what has come)."""
        data = b""
        while len(data) < n:
            chunk = self._stream.read(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def _next_frame_length(self) -> int:
        raw = self._read_exactly(_LENGTH.size)
        if len(raw) != _LENGTH.size:
            raise FramingError(f"the stream was cut after {self.size} bytes of the archive, before its "
                               "trailer: the sender gave up or the connection broke")
        n = _LENGTH.unpack(raw)[0]
        if n > MAX_FRAME:
            raise FramingError(f"a frame of {n} bytes announced (at most {MAX_FRAME})")
        if self.size + n > self._max:
            raise FramingError(f"the archive exceeds {self._max} bytes (the size budget, bounded by the "
                               "free space)")
        return n

    def _read_trailer(self) -> ArchiveDigest:
        line = self._stream.readline(_MAX_LINE)
        if not line.endswith(b"\n"):
            raise FramingError("the stream was cut inside the trailer")
        try:
            doc = json.loads(line)
        except ValueError:
            doc = None
        written = ArchiveDigest.from_json(doc)
        if written is None:
            raise FramingError("the trailer is not a digest, diffId and size")
        actual = "sha256:" + self._hash.hexdigest() if self._hash is not None else written.digest
        if written.size != self.size or written.digest != actual:
            raise not_what_was_written(self.size, actual, written)
        return written


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def not_what_was_written(size: int, digest: str, written: ArchiveDigest) -> FramingError:
    return FramingError(f"the archive received ({size} bytes, {digest}) is not the one the source wrote "
                        f"({written.size} bytes, {written.digest})")
