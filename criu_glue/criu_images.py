"""CRIU image files, read and written in pyshim's own process (no crit, no second interpreter).

A CRIU image file (criu.org/Images, CRIU's lib/pycriu/images/images.py) is:

    IMAGE   ::= [COMMON_MAGIC | SERVICE_MAGIC] MAGIC { ENTRY }
    ENTRY   ::= SIZE PAYLOAD [ EXTRA ]

every number a little-endian u32. The first magic is IMG_COMMON (IMG_SERVICE for stats-* and
irmap-cache) and absent only for inventory.img; the second names the image type. PAYLOAD is one
protobuf message of the type's kind (the vendored criu_glue/criu_pb/*.proto, CRIU 4.2). A few
types follow an entry with EXTRA bytes that the entry sizes: of those only tcp-stream (the
socket's receive and send queues, inq_len + outq_len bytes) is read here; pages, ghost files and
the other bulky ones are CRIU's business alone.

The images come from a checkpoint, i.e. untrusted input: every length is checked against what is
left of the file, a file is read only up to MAX_IMAGE_BYTES, and anything malformed is a
CriuImageError naming the file.
"""
from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError, Message

from .criu_pb import core_pb2, fdinfo_pb2, inventory_pb2, mnt_pb2, pstree_pb2, stats_pb2, tcp_stream_pb2, utsns_pb2
from .errors import ArchiveError

IMG_COMMON_MAGIC = 0x54564319   # "Sarov": in front of every image but inventory
IMG_SERVICE_MAGIC = 0x55105940  # "Zlatoust": in front of stats-* and irmap-cache
# The metadata images read here are kilobytes; a bigger one is not a CRIU image we want in memory.
MAX_IMAGE_BYTES = 64 << 20
_U32 = struct.Struct("<I")


class CriuImageError(ArchiveError):
    """A CRIU image could not be read or written (wrong type, truncated, not protobuf)."""


@dataclass(frozen=True)
class ImageKind:
    name: str           # CRIU's name for the type (pycriu's magic names)
    magic: int
    message: type[Message]
    service: bool = False  # IMG_SERVICE_MAGIC instead of IMG_COMMON_MAGIC in front
    first_magic: bool = True  # False only for inventory.img


# The types pyshim reads (criu/include/magic.h and images.py's handlers, CRIU 4.2).
INVENTORY = ImageKind("INVENTORY", 0x58313116, inventory_pb2.inventory_entry, first_magic=False)
PSTREE = ImageKind("PSTREE", 0x50273030, pstree_pb2.pstree_entry)
CORE = ImageKind("CORE", 0x55053847, core_pb2.core_entry)
UTSNS = ImageKind("UTSNS", 0x54473203, utsns_pb2.utsns_entry)
FILES = ImageKind("FILES", 0x56303138, fdinfo_pb2.file_entry)
MNTS = ImageKind("MNTS", 0x55563928, mnt_pb2.mnt_entry)
TCP_STREAM = ImageKind("TCP_STREAM", 0x51465506, tcp_stream_pb2.tcp_stream_entry)
STATS = ImageKind("STATS", 0x57093306, stats_pb2.stats_entry, service=True)
KINDS = (INVENTORY, PSTREE, CORE, UTSNS, FILES, MNTS, TCP_STREAM, STATS)


@dataclass
class CriuImage:
    """One image file: its entries, and each entry's extra bytes (b"" for types without)."""
    kind: ImageKind
    entries: list[Message]
    extras: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.extras:
            self.extras = [b""] * len(self.entries)
        if len(self.extras) != len(self.entries):
            raise ValueError("CriuImage: one extra per entry")


def _extra_size(kind: ImageKind, entry: Message) -> int:
    """How many bytes follow `entry` in the file (images.py's extra handlers)."""
    if kind is TCP_STREAM:
        return entry.inq_len + entry.outq_len
    return 0


def decode_image(data: bytes, kind: ImageKind, label: str = "CRIU image") -> CriuImage:
    """Parse the bytes of one image file, which must be of `kind`."""
    offset = 0

    def u32(what: str) -> int:
        nonlocal offset
        if len(data) - offset < 4:
            raise CriuImageError(f"{label}: truncated {what} at byte {offset}")
        (value,) = _U32.unpack_from(data, offset)
        offset += 4
        return value

    if kind.first_magic:
        first = u32("magic")
        expected = IMG_SERVICE_MAGIC if kind.service else IMG_COMMON_MAGIC
        if first != expected:
            raise CriuImageError(f"{label}: not a CRIU image (magic {first:#x}, expected {expected:#x})")
    magic = u32("magic")
    if magic != kind.magic:
        raise CriuImageError(f"{label}: a CRIU image of type {_kind_name(magic)}, expected {kind.name}")
    entries: list[Message] = []
    extras: list[bytes] = []
    while offset < len(data):
        size = u32("entry size")
        if size > len(data) - offset:
            raise CriuImageError(f"{label}: entry {len(entries)} claims {size} bytes, "
                                 f"{len(data) - offset} are left")
        entry = kind.message()
        try:
            entry.ParseFromString(data[offset:offset + size])
        except DecodeError as e:
            raise CriuImageError(f"{label}: entry {len(entries)} is not a valid {kind.message.__name__}: "
                                 f"{e}") from None
        offset += size
        extra = _extra_size(kind, entry)
        if extra > len(data) - offset:
            raise CriuImageError(f"{label}: entry {len(entries)} is followed by {extra} bytes of data, "
                                 f"{len(data) - offset} are left")
        entries.append(entry)
        extras.append(data[offset:offset + extra])
        offset += extra
    return CriuImage(kind, entries, extras)


def encode_image(image: CriuImage) -> bytes:
    """The bytes of an image file, as CRIU writes it."""
    kind = image.kind
    parts = []
    if kind.first_magic:
        parts.append(_U32.pack(IMG_SERVICE_MAGIC if kind.service else IMG_COMMON_MAGIC))
    parts.append(_U32.pack(kind.magic))
    for entry, extra in zip(image.entries, image.extras):
        if not isinstance(entry, kind.message):
            raise TypeError(f"a {kind.name} image holds {kind.message.__name__}, not {type(entry).__name__}")
        if len(extra) != _extra_size(kind, entry):
            raise ValueError(f"{kind.name} entry sizes {_extra_size(kind, entry)} bytes of extra data, "
                             f"{len(extra)} given")
        payload = entry.SerializeToString()
        parts += [_U32.pack(len(payload)), payload, extra]
    return b"".join(parts)


def read_image(path: Path, kind: ImageKind) -> CriuImage:
    """Read one image file (a regular file, not followed through a symlink) of `kind`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise CriuImageError(f"cannot open CRIU image {path.name}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not (st.st_mode & 0o170000 == 0o100000):
            raise CriuImageError(f"CRIU image {path.name} is not a regular file")
        if st.st_size > MAX_IMAGE_BYTES:
            raise CriuImageError(f"CRIU image {path.name} is {st.st_size} bytes; pyshim reads at most "
                                 f"{MAX_IMAGE_BYTES} of a {kind.name} image")
        data = f.read(MAX_IMAGE_BYTES + 1)
    return decode_image(data, kind, path.name)


def write_image(path: Path, image: CriuImage) -> None:
    """Write `image` to `path` as a new file (mode 0600) renamed over whatever was there.

    Never in place: `path` may be a hard link to a file shared by other restores (the store's
    copy of a checkpoint image), which must stay as it is; and a crash leaves the old image or
    the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode_image(image))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _kind_name(magic: int) -> str:
    known = next((k.name for k in KINDS if k.magic == magic), None)
    return known or f"{magic:#x}"
