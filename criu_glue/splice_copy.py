"""Bytes from a pipe or a socket into a file by the kernel (splice(2)): none of them through Python.

The receiver of `pyshim migrate --direct` writes ~every byte of a checkpoint into a file as it arrives.
Read into Python and written out again, each byte is copied twice through user space; on the 2-CPU VM
of the benchmarks, copying user memory into fresh page-cache pages alone cost 0.4-3.5 s of CPU per GiB
(perf: copy_folio_from_iter_atomic), kernel-to-kernel copies about 0.4 s. splice moves the bytes from
the socket or pipe to the file inside the kernel. A socket needs a pipe in between (splice has a pipe at
one end or the other); a pipe (ssh's stdout) goes to the file directly.
"""
from __future__ import annotations

import fcntl
import io
import os
import stat

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_BYTES = 1 << 20


class Splicer:
    """Moves bytes from `source_fd` (a blocking pipe or socket) into files; see the module docstring."""

    def __init__(self, source_fd: int):
        self._fd = source_fd
        self._pipe: tuple[int, int] | None = None
        if not stat.S_ISFIFO(os.fstat(source_fd).st_mode):
            self._pipe = os.pipe2(os.O_CLOEXEC)
            try:
                fcntl.fcntl(self._pipe[1], _F_SETPIPE_SZ, _PIPE_BYTES)  # fewer, larger moves
            except OSError:
                pass  # /proc/sys/fs/pipe-max-size may be lower: the default size works too

    @staticmethod
    def for_stream(stream) -> "Splicer | None":
        """A Splicer for `stream` if it is an unbuffered stream (no bytes read ahead in Python) on a
        blocking pipe or socket; None otherwise (a file, a BytesIO, a buffered reader)."""
        if not isinstance(stream, io.RawIOBase):
            return None
        try:
            fd = stream.fileno()
            mode = os.fstat(fd).st_mode
            blocking = not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        except (OSError, ValueError, io.UnsupportedOperation):
            return None
        if not blocking or not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return None
        return Splicer(fd)

    def move(self, out_fd: int, count: int) -> int:
        """Up to `count` bytes (as many as have come, at least one; blocks until then) appended to the file
        `out_fd` at its position; returns how many, 0 at the end of the source."""
        if self._pipe is None:
            return os.splice(self._fd, out_fd, count)
        read_end, write_end = self._pipe
        n = os.splice(self._fd, write_end, count)
        done = 0
        while done < n:  # the pipe holds exactly these n bytes: empty it before the next move
            done += os.splice(read_end, out_fd, n - done)
        return n

    def close(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
