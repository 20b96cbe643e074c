"""Reading tar streams from untrusted sources without inheriting tarfile's leniency.

Python's tarfile is built for convenience, not for hostile input:
- a truncated archive, or garbage where the next header should be, reads as a normal end, so a
  half-copied checkpoint would restore with pages missing. Here only a real end-of-archive block
  ends the stream; anything else is CorruptTar.
- an extended (pax / GNU long name) header is read into memory whole, whatever size it claims.
  Here it is capped at MAX_EXTENDED_HEADER.
- every member ever read is kept in TarFile.members; `members()` drops them as it goes so a
  million-entry archive costs no more memory than a small one.

Path safety reuses oci.layers (the same rules as image layers: no absolute names, no `..`, no
writing through symlinks), translated into this package's UnsafeArchive.
"""
from __future__ import annotations

import gzip
import os
import tarfile
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from oci.errors import UnsafeLayer
from oci.layers import GZIP_MAGIC, ZSTD_MAGIC, clean_member_path, corrupt_stream_errors, safe_path_in  # noqa: F401 - re-exported

from .errors import UnsafeArchive

MAX_EXTENDED_HEADER = 1 << 20
_EXTENDED_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                          tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_PAX_XATTR_PREFIX = "SCHILY.xattr."
COPY_CHUNK = 1 << 20

COMPRESSIONS = ("none", "gzip", "zstd")


class CorruptTar(tarfile.TarError):
    """The stream is not a complete, well-formed tar archive."""


class _GuardedTarInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EmptyHeaderError:
            raise CorruptTar(f"archive ends at offset {tf.offset} without an end-of-archive "
                             "block (truncated)") from None
        except tarfile.TruncatedHeaderError:
            raise CorruptTar(f"truncated header at offset {tf.offset}") from None
        except tarfile.InvalidHeaderError as exc:
            raise CorruptTar(f"invalid header at offset {tf.offset}: {exc}") from None

    def _proc_member(self, tf):
        if self.type in _EXTENDED_HEADER_TYPES and self.size > MAX_EXTENDED_HEADER:
            raise CorruptTar(f"extended header at offset {self.offset} claims {self.size} bytes "
                             f"(limit {MAX_EXTENDED_HEADER})")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise CorruptTar(f"GNU sparse member at offset {self.offset} is not supported")
        return super()._proc_member(tf)

    def _proc_pax(self, tf):
        """tarfile's own pax parser with a linear record parser in place of its regular
        expressions, which take quadratic time on long digit runs (CVE-2024-6232; Python
        3.11.7 is affected): a 1 MiB header of digits would stall a restore for hours."""
        size = self.size
        buf = tf.fileobj.read(self._block(size))
        if len(buf) < size:
            raise CorruptTar(f"extended header at offset {self.offset} is truncated")
        records = _parse_pax_records(buf[:size], self.offset)
        pax_headers = tf.pax_headers if self.type == tarfile.XGLTYPE else tf.pax_headers.copy()
        for keyword, value in records:
            if keyword == b"hdrcharset":
                pax_headers["hdrcharset"] = value.decode("utf-8", tf.errors)
        # hdrcharset=BINARY: names are raw bytes in the archive's encoding, not UTF-8.
        encoding = tf.encoding if pax_headers.get("hdrcharset") == "BINARY" else "utf-8"
        for raw_keyword, raw_value in records:
            keyword = self._decode_pax_field(raw_keyword, "utf-8", "utf-8", tf.errors)
            if keyword.startswith("GNU.sparse."):
                raise CorruptTar(f"GNU sparse member at offset {self.offset} is not supported")
            if keyword in tarfile.PAX_NAME_FIELDS:
                value = self._decode_pax_field(raw_value, encoding, tf.encoding, tf.errors)
            else:
                value = self._decode_pax_field(raw_value, "utf-8", "utf-8", tf.errors)
            pax_headers[keyword] = value
        try:
            following = self.fromtarfile(tf)
        except tarfile.HeaderError as exc:
            raise CorruptTar(f"bad header after the extended header at offset {self.offset}: "
                             f"{exc}") from None
        if self.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            following._apply_pax_info(pax_headers, tf.encoding, tf.errors)
            following.offset = self.offset
            if "size" in pax_headers:
                # The header's own size field was overridden: where the next header starts moves.
                offset = following.offset_data
                if following.isreg() or following.type not in tarfile.SUPPORTED_TYPES:
                    offset += following._block(following.size)
                tf.offset = offset
        return following


def _parse_pax_records(buf: bytes, offset: int) -> list[tuple[bytes, bytes]]:
    """Split "<length> <keyword>=<value>\n" records in one linear pass."""
    records = []
    pos = 0
    while pos < len(buf):
        space = buf.find(b" ", pos, pos + 21)
        digits = buf[pos:space] if space > pos else b""
        if not digits.isdigit():
            if not buf[pos:].strip(b"\0"):
                break  # NUL padding after the last record
            raise CorruptTar(f"malformed pax record in the extended header at offset {offset}")
        length = int(digits)
        end = pos + length
        record = buf[space + 1:end]
        equals = record.find(b"=")
        if end > len(buf) or length <= len(digits) + 1 or equals <= 0 \
                or not record.endswith(b"\n"):
            raise CorruptTar(f"malformed pax record in the extended header at offset {offset}")
        records.append((record[:equals], record[equals + 1:-1]))
        pos = end
    return records


def detect_compression(raw: BinaryIO) -> str:
    """"none", "gzip" or "zstd" from the magic bytes; the file position is left at 0."""
    raw.seek(0)
    magic = raw.read(4)
    raw.seek(0)
    if magic.startswith(GZIP_MAGIC):
        return "gzip"
    if magic == ZSTD_MAGIC:
        return "zstd"
    return "none"


@contextmanager
def decompressed(raw: BinaryIO, compression: str) -> Iterator[BinaryIO]:
    """The uncompressed bytes of `raw` (positioned at 0), streamed, never held in memory."""
    raw.seek(0)
    if compression == "none":
        yield raw
    elif compression == "gzip":
        with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            yield gz
    elif compression == "zstd":
        import zstandard
        # read_across_frames: multi-threaded compressors (pzstd, zstd -T --rsyncable) write
        # several frames; stopping after the first would look like a truncated archive.
        with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                        closefd=False) as zs:
            yield zs
    else:
        raise ValueError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")


def open_tar(fileobj: BinaryIO, *, seekable: bool, bufsize: int = tarfile.RECORDSIZE) -> tarfile.TarFile:
    """A reading TarFile with the guards above; `seekable` lets it skip file data by seeking.
    `bufsize`: how much a non-seekable stream is read at a time (tarfile's default is 10 KiB)."""
    if seekable:
        return tarfile.open(fileobj=fileobj, mode="r:", tarinfo=_GuardedTarInfo, encoding="utf-8",
                            errors="surrogateescape")
    return tarfile.open(fileobj=fileobj, mode="r|", tarinfo=_GuardedTarInfo, encoding="utf-8",
                        errors="surrogateescape", bufsize=bufsize)


class ForwardReader:
    """A non-seekable stream (a download, a pipe) as tarfile's *seekable* mode ("r:") reads it: seeks go
    forward only (skipping), and member data can be taken as the stream's own chunks (read_view), so
    a large member is written out without the copies tarfile's stream mode ("r|") makes (its buffer is
    re-joined and re-sliced at every read: about 3x slower on a 256 MiB CRIU image). tarfile parses
    every header as in stream mode; a backward seek is a ReadError (no well-formed tar needs one).

    `sink(offset, bytes)`, if given, sees every byte of the stream except the member data taken with
    copy_member_data: headers, padding, and the members skipped (a receiver writes them to the layer
    blob, whose CRIU image data it writes later, from the unpacked files)."""

    def __init__(self, raw: BinaryIO, sink: Callable[[int, memoryview], None] | None = None):
        self._raw = raw
        self._pos = 0
        self._view = memoryview(b"")
        self._sink = sink

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self._pos:
            raise tarfile.ReadError(f"the tar stream would have to be read backwards (to offset {pos})")
        while self._pos < pos:
            if not self.read_view(pos - self._pos):
                break  # past the end: the next read finds nothing, as tarfile expects
        return self._pos

    def read_view(self, size: int, member_data: bool = False) -> memoryview:
        """Up to `size` bytes, without a copy; empty at the end of the stream. Bytes that are not
        `member_data` go to the sink too."""
        if not self._view:
            self._view = memoryview(self._raw.read(COPY_CHUNK))
        view, self._view = self._view[:size], self._view[size:]
        if self._sink is not None and view and not member_data:
            self._sink(self._pos, view)
        self._pos += len(view)
        return view

    def move_into(self, fd: int, count: int) -> int:
        """Up to `count` bytes of member data appended to the file `fd`; 0 at the end of the stream. What
        this reader holds already is written from memory; beyond that, a stream that can move bytes into a
        file itself (FrameReader.move_into: in the kernel) does so."""
        if not self._view and hasattr(self._raw, "move_into"):
            n = self._raw.move_into(fd, count)
            self._pos += n
            return n
        view = self.read_view(min(COPY_CHUNK, count), member_data=True)
        n = len(view)
        while view:  # a regular file may take less than asked
            view = view[os.write(fd, view):]
        return n

    def drain(self) -> None:
        """Read the stream to its end (what follows the tar's end-of-archive block)."""
        while self.read_view(COPY_CHUNK):
            pass

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise tarfile.ReadError("the tar stream cannot be read whole")
        parts = []
        while size > 0:
            view = self.read_view(size)
            if not view:
                break
            parts.append(view)
            size -= len(view)
        return b"".join(parts)


def copy_member_data(reader: ForwardReader, fd: int, size: int, what: str) -> None:
    """Write the next `size` bytes of `reader` to the file `fd`; a short stream is an error."""
    remaining = size
    while remaining:
        n = reader.move_into(fd, remaining)
        if not n:
            raise CorruptTar(f"{what}: data ends {remaining} bytes early (truncated)")
        remaining -= n


def members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members in stream order; read a member's data before asking for the next one."""
    while True:
        member = tar.next()
        if member is None:
            return
        tar.members.clear()
        yield member


def member_name(member: tarfile.TarInfo, archive: str = "") -> str:
    """The member's name, normalised ("./a//b/" -> "a/b", root -> "."), refusing escapes."""
    return str(translate_unsafe(lambda: clean_member_path(member.name), member.name, archive))


def safe_member_path(root: Path, name: str, *, create_parents: bool = False,
                     archive: str = "") -> Path:
    """oci.layers.safe_path_in, reporting refusals as UnsafeArchive."""
    return translate_unsafe(lambda: safe_path_in(root, name, create_parents=create_parents),
                            name, archive)


def translate_unsafe(fn, name: str, archive: str):
    try:
        return fn()
    except UnsafeLayer as exc:
        raise UnsafeArchive(name, exc.reason, archive) from None


def member_mtime_ns(member: tarfile.TarInfo) -> int:
    """Exact modification time: pax "mtime" carries nanoseconds that a float would round."""
    text = member.pax_headers.get("mtime")
    if text is not None:
        try:
            return int(Decimal(text).scaleb(9).to_integral_value())
        except (InvalidOperation, ValueError):
            pass
    return int(member.mtime) * 1_000_000_000


def set_exact_mtime(info: tarfile.TarInfo, mtime_ns: int) -> None:
    """Record mtime to the nanosecond (pax) with the whole seconds in the ustar field."""
    seconds, nanos = divmod(mtime_ns, 1_000_000_000)
    info.mtime = seconds
    if nanos:
        info.pax_headers["mtime"] = f"{seconds}.{nanos:09d}"


def member_xattrs(member: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
    for key, value in member.pax_headers.items():
        if key.startswith(_PAX_XATTR_PREFIX):
            yield key[len(_PAX_XATTR_PREFIX):], value.encode("utf-8", "surrogateescape")


def add_xattr(info: tarfile.TarInfo, name: str, value: bytes) -> None:
    # surrogateescape keeps binary values (security.capability) byte-exact: tarfile then writes
    # the header with hdrcharset=BINARY, and member_xattrs() turns them back into the same bytes.
    info.pax_headers[_PAX_XATTR_PREFIX + name] = value.decode("utf-8", "surrogateescape")


def copy_exactly(src: BinaryIO, dst: BinaryIO, size: int, what: str) -> None:
    """Copy `size` bytes; a short source is an error, not a silently short file."""
    remaining = size
    while remaining:
        chunk = src.read(min(COPY_CHUNK, remaining))
        if not chunk:
            raise CorruptTar(f"{what}: data ends {remaining} bytes early (truncated)")
        dst.write(chunk)
        remaining -= len(chunk)

