"""A checkpoint image received from a stream (`pyshim migrate --direct`): one write per byte before the restore.

The source sends the archive while its daemon writes it, framed, its digest and size last
(criu_glue.archive_frames). Here the stream is read once, in one pass:

- its bytes are hashed and counted as they arrive (FrameReader), and the trailer must match them;
- tarfile parses its headers (ForwardReader); the data of each CRIU image goes straight to its file
  in a private scratch directory (the same rules as any unpacking of a checkpoint: regular files and
  directories only, safe names, the size budget bounded by the free space);
- everything else (headers, padding, the metadata members and the rootfs diff) is written at its
  offset in the layer blob's temporary file. The blob's CRIU image ranges stay holes: those bytes are
  written once, as the unpacked images a restore links, not twice.

Only when the trailer matched is anything used: the archive is indexed as a restore indexes it
(open_archive: names, duplicates, required members, metadata) and the unpacked files must be exactly
its checkpoint/ members; the blob is marked unsynced in the store (oci.store.mark_unsynced) before it
is renamed in, then the unpacked images become the blob's checkpoint entry and the image is recorded.
A restore reads the metadata from the blob and the CRIU images from the entry, so it may start now.

complete_received_blob, called after that (the move runs it while the container is restored), copies
the CRIU images' bytes into the blob's holes from the entry, checks the blob against its digest, and
syncs both to disk; only then is the marker removed. Until then nothing but a restore should read the
blob's CRIU image ranges: a crash in between is repaired by the store's next sole opener, which
re-hashes every marked blob and removes a blob that does not match its digest with its image.
Any failure before the image is recorded leaves nothing in the store.

A compressed archive (a source daemon with checkpoint.compression set) cannot be split this way: it
is stored whole, unpacked at its first restore, as before; it is synced after the restore too
(complete_received_blob), marked unsynced until then like a split one.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from oci.errors import ImageError
from oci.store import ImageRecord, ImageStore, normalize_tag
from oci.tree_removal import remove_tree

from .archive import ArchiveDigest, ImageExtent, extract_checkpoint_images_from_reader, open_archive
from .archive_frames import FrameReader, FramingError, read_header
from .checkpoint_image import CheckpointImageError, documents_for_written_archive
from .checkpoint_pull import unpacked_files
from .errors import ArchiveError
from .limits import Budget, Limits
from .tarstream import COPY_CHUNK, GZIP_MAGIC, ZSTD_MAGIC, ForwardReader

_CHECKPOINT_PREFIX = "checkpoint/"
_MAGIC_BYTES = max(len(GZIP_MAGIC), len(ZSTD_MAGIC))


@dataclass(frozen=True)
class ReceivedCheckpoint:
    record: ImageRecord
    digest: str                         # the layer blob's
    phases_ms: dict                     # data (to the trailer), check (the archive indexed), record
    pending: tuple[ImageExtent, ...]    # CRIU image data still to copy into the blob (complete_received_blob)


def receive_streamed_checkpoint_image(store: ImageStore, stream: BinaryIO, limits: Limits) -> ReceivedCheckpoint:
    """The framed archive on `stream` becomes a checkpoint image in `store` (see the module docstring).
    The caller must call complete_received_blob() afterwards."""
    tag = read_header(stream)
    try:
        tag = normalize_tag(tag)
    except ImageError as exc:
        raise CheckpointImageError(f"cannot tag a checkpoint image {tag!r}: {exc}") from None
    started = time.monotonic()
    frames = FrameReader(stream, limits.max_total_bytes)
    try:
        head = _Peeked(frames)
        if head.first.startswith((GZIP_MAGIC, ZSTD_MAGIC)):
            return _receive_whole(store, head, frames, tag, limits, started)
        return _receive_split(store, head, frames, tag, limits, started)
    finally:
        frames.close()


def complete_received_blob(store: ImageStore, received: ReceivedCheckpoint) -> None:
    """Copy the CRIU images' bytes into the blob from the unpacked entry, check the blob against its
    digest, and sync both; ImageError if the blob does not match (it is then left marked, and the
    store's next sole opener removes it with its image)."""
    if received.pending:
        blob = store.blob_path(received.digest)
        entry = store.unpacked_checkpoint_path(received.digest)
        try:
            fd = os.open(blob, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # the image was removed meanwhile: nothing to complete
        try:
            for extent in received.pending:
                _copy_into(entry / extent.rel, fd, extent)
        finally:
            os.close(fd)
        if not store.blob_matches(received.digest):
            raise ImageError(f"the received checkpoint blob {received.digest} does not match its digest once "
                             "completed from its unpacked images; it is removed at the store's next start")
    store.sync_blob(received.digest)


# ---- the two ways in ------------------------------------------------------------------------------

def _receive_split(store: ImageStore, head: "_Peeked", frames: FrameReader, tag: str, limits: Limits,
                   started: float) -> ReceivedCheckpoint:
    label = f"received checkpoint {tag}"
    fd, tmp = store.new_blob_file()
    scratch = store.scratch_dir("checkpoint-receive-")
    images = scratch / "images"
    try:
        reader = ForwardReader(head, sink=lambda offset, view: _write_at(fd, offset, view))
        extents = extract_checkpoint_images_from_reader(reader, images, Budget(limits, label), label)
        reader.drain()  # to the trailer, which FrameReader checks against what it hashed and counted
        written = _trailer(frames)
        os.ftruncate(fd, written.size)  # the CRIU images at the end of the archive are holes too
        data_done = time.monotonic()
        _check_unpacked(tmp, images, limits, label)
        checked = time.monotonic()
        record = _adopt_unsynced(store, tmp, written, tag, limits, images)
    finally:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        remove_tree(scratch, ignore_errors=True)
    return ReceivedCheckpoint(record, written.digest, _ms(started, data_done, checked), tuple(extents))


def _receive_whole(store: ImageStore, head: "_Peeked", frames: FrameReader, tag: str, limits: Limits,
                   started: float) -> ReceivedCheckpoint:
    """A compressed archive: the blob is written whole, as it arrives, and not synced here (FrameReader
    hashes and counts it, and checks the trailer); it is marked unsynced before it appears under its
    digest, and complete_received_blob syncs it after the restore, as for a split one."""
    fd, tmp = store.new_blob_file()
    try:
        offset = 0
        while chunk := head.read(COPY_CHUNK):
            _write_at(fd, offset, memoryview(chunk))
            offset += len(chunk)
        written = _trailer(frames)  # read() returned b"" only after the trailer matched
        data_done = time.monotonic()
        record = _adopt_unsynced(store, tmp, written, tag, limits)
    finally:
        os.close(fd)
        tmp.unlink(missing_ok=True)
    return ReceivedCheckpoint(record, written.digest, _ms(started, data_done, data_done), ())


def _adopt_unsynced(store: ImageStore, tmp: Path, written: ArchiveDigest, tag: str, limits: Limits,
                    unpacked: Path | None = None) -> ImageRecord:
    """The received blob under its digest, marked unsynced before it is visible there (not synced yet:
    complete_received_blob does that after the restore), its unpacked images if any, and the image
    record. On any failure nothing of it stays."""
    digest = written.digest
    try:
        store.mark_unsynced(digest)
        store.adopt_blob_file(tmp, digest)
        if unpacked is not None:
            store.adopt_unpacked_checkpoint(digest, unpacked)
        return _record(store, written, tag, limits)
    except BaseException:
        store.discard_unreferenced_blobs({digest})
        raise


# ---- pieces ---------------------------------------------------------------------------------------

class _Peeked:
    """`frames` with its first chunk read ahead (to tell a compressed archive from a plain tar)."""

    def __init__(self, frames: FrameReader):
        self._frames = frames
        first = b""
        while len(first) < _MAGIC_BYTES:  # frames may be as short as the source's first write
            chunk = frames.read(COPY_CHUNK)
            if not chunk:
                break
            first += chunk
        self.first = self._pending = first

    def read(self, size: int = -1) -> bytes:
        if self._pending:
            if size is None or size < 0 or size >= len(self._pending):
                chunk, self._pending = self._pending, b""
            else:
                chunk, self._pending = self._pending[:size], self._pending[size:]
            return chunk
        return self._frames.read(size)

    def move_into(self, fd: int, count: int) -> int:
        """FrameReader.move_into, once the bytes read ahead are out."""
        if not self._pending:
            return self._frames.move_into(fd, count)
        view = memoryview(self.read(count))
        n = len(view)
        while view:
            view = view[os.write(fd, view):]
        return n


def _write_at(fd: int, offset: int, view: memoryview) -> None:
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _trailer(frames: FrameReader) -> ArchiveDigest:
    while frames.read(COPY_CHUNK):  # anything after the tar's end is part of the archive too
        pass
    if frames.trailer is None:  # read() returns b"" only at a checked trailer: cannot happen
        raise FramingError("the received archive ended without its trailer")
    return frames.trailer


def _check_unpacked(blob: Path, images: Path, limits: Limits, label: str) -> None:
    """The archive passes every check a restore makes, and `images` holds exactly its checkpoint/
    members (as unpacking during a pull requires before its files are used)."""
    with open_archive(blob, limits) as archive:
        expected = {m.name[len(_CHECKPOINT_PREFIX):]: (m.size if m.kind == "file" else None)
                    for m in archive.checkpoint_members()}
    if unpacked_files(images) != expected:
        raise ArchiveError(f"the CRIU images unpacked from the {label} are not its checkpoint/ members")


def _record(store: ImageStore, written: ArchiveDigest, tag: str, limits: Limits) -> ImageRecord:
    documents = documents_for_written_archive(store.blob_path(written.digest), written, limits)
    return store.add_image(documents.manifest, documents.config, [tag])


def _copy_into(source: Path, fd: int, extent: ImageExtent) -> None:
    with open(source, "rb") as src:
        copied = 0
        while copied < extent.size:
            n = os.copy_file_range(src.fileno(), fd, extent.size - copied, copied, extent.offset + copied)
            if n == 0:
                raise ArchiveError(f"the unpacked image {source} is shorter than its {extent.size} bytes")
            copied += n


def _ms(started: float, data_done: float, checked: float) -> dict:
    now = time.monotonic()
    return {"data": round((data_done - started) * 1000, 1), "check": round((checked - data_done) * 1000, 1),
            "record": round((now - checked) * 1000, 1)}
