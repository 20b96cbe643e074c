"""A plain (uncompressed) tar whose members' data the kernel copies: no byte of a CRIU image passes through Python.

A checkpoint archive is mostly the container's memory pages, just written by CRIU and still in the page
cache. tarfile would read each image into a Python buffer and write it out again (two copies through user
space, a fresh 16 MiB buffer per chunk, and the GIL taken back after every read and write, which in a busy
daemon costs up to the switch interval each time). Here each member's data goes from its file to the
archive with sendfile(2): one copy, page cache to page cache, the GIL released for the whole call. It works
between any two file systems (the archive may be on a tmpfs, `--archive-dir`); copy_file_range(2) would
not, and where it clones extents (XFS, btrfs) it first writes the images to disk.

The bytes are tarfile's own: each header is TarInfo.tobuf in the pax format, data padded to 512-byte
blocks, and the end-of-archive blocks padded to a 10 KiB record, exactly what tarfile's "w" mode writes
(a unit test compares the two byte for byte), so checkpointctl, Podman and CRI-O read it as before.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Callable

from .errors import ArchiveError

FORMAT = tarfile.PAX_FORMAT
ENCODING, ERRORS = "utf-8", "surrogateescape"
# What the kernel copies before the writer reports progress (a hasher or a follower reads behind it):
# large enough that the GIL is taken back a few dozen times per GiB, small enough to keep them close.
COPY_STEP = 32 << 20
_BLOCK, _RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


class PlainTarWriter:
    """Appends members to the tar at `fd` (a regular file, written from its current position, which must
    be 0). `progress(size)` is called whenever the file's first `size` bytes are complete."""

    def __init__(self, fd: int, progress: Callable[[int], None] = lambda size: None):
        self._fd = fd
        self._progress = progress
        self.size = 0

    def add(self, info: tarfile.TarInfo, source: Path | None = None) -> None:
        """A header for `info`, and for a regular file the `info.size` bytes of `source` (opened here,
        not following a symlink). ArchiveError if `source` holds fewer bytes than that."""
        self._write(info.tobuf(FORMAT, ENCODING, ERRORS))
        if not info.isreg():
            return
        if source is None:
            raise ValueError(f"a regular file member ({info.name}) needs its source file")
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self._copy(fd, info.size, source)
        finally:
            os.close(fd)
        self._pad(_BLOCK)
        self._progress(self.size)

    def close(self) -> None:
        """The end-of-archive marker (two zero blocks), padded to a whole record as tarfile does."""
        self._write(bytes(2 * _BLOCK))
        self._pad(_RECORD)
        self._progress(self.size)

    def _copy(self, source_fd: int, count: int, source: Path) -> None:
        offset = 0
        while offset < count:
            step = min(count - offset, COPY_STEP)
            while step:
                n = os.sendfile(self._fd, source_fd, offset, step)
                if n == 0:
                    raise ArchiveError(f"cannot pack {source}: it ended at byte {offset} of {count} "
                                       "(it shrank while being packed)")
                offset += n
                step -= n
                self.size += n
            self._progress(self.size)

    def _pad(self, unit: int) -> None:
        remainder = self.size % unit
        if remainder:
            self._write(bytes(unit - remainder))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.size += len(data)
