"""A checkpoint image's CRIU images unpacked while its layer downloads: one pass over the bytes at pull.

PullImage of a checkpoint image used to write the layer blob, then read it back to unpack its CRIU
images into the store's `checkpoints/` entry (criu_glue.checkpoint_cache). Here the downloaded bytes
are handed, as they arrive, to a thread that unpacks the tar's checkpoint/ members into a private
scratch directory of the store, while the store writes and hashes the same bytes as the blob.

Nothing unpacked this way is used before it is proven to be the blob's content:
- the store verified the blob against its digest (oci.store.write_blob), and the unpacking saw exactly
  the bytes that were hashed, no more, no less (a short or skipped download is discarded);
- the complete blob is then indexed with open_archive (every check a restore makes of an archive:
  names, duplicates, required members, metadata) and the unpacked files must be exactly its
  checkpoint/ members with their sizes;
- only then does the scratch directory become the entry (read-only, renamed into place).
Any failure -- a hostile member, the size budget (bounded by the free space), a full disk, a digest
mismatch, an interrupted download -- removes the scratch directory and leaves the store as it was;
the pull itself is not failed by the unpacking (restore unpacks from the blob and reports the problem
itself, as before). A crash leaves only the scratch directory under tmp/, which the store clears at
its next start.

`receive_checkpoint_image` does the same for an archive piped from another node (`pyshim migrate
--direct`, `pyshim checkpoint-image receive`), and records it as a checkpoint image.

Only plain tar layers are unpacked this way (a checkpoint image built from a pyshim archive by a move or
`checkpoint-image build` with compression "keep" of an uncompressed archive); compressed ones are
unpacked after the download, from the blob, as before.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections import deque
from pathlib import Path

from typing import BinaryIO, Callable

from oci.errors import ImageError
from oci.layout import MEDIA_TYPE_LAYER_TAR
from oci.registry import TeeReader
from oci.store import Descriptor, ImageRecord, ImageStore, normalize_tag
from oci.tree_removal import remove_tree

from .archive import ArchiveDigest, extract_checkpoint_images_from_stream, open_archive
from .checkpoint_image import CHECKPOINT_ANNOTATIONS, CheckpointImageError, documents_for_written_archive
from .errors import ArchiveError
from .limits import Limits

log = logging.getLogger(__name__)

_PIPE_CHUNKS = 16  # chunks buffered between the download and the unpacking (~16 MiB)
_CHECKPOINT_PREFIX = "checkpoint/"


def unpack_while_pulling(store: ImageStore, limits: Limits):
    """A blob_tap factory for oci.registry.RegistryClient.pull: a tap for the layer of a checkpoint
    image (recognised by its manifest or index annotations) that is a plain tar, None otherwise."""
    def tap_for(annotations: dict[str, str], layers: list[Descriptor], descriptor: Descriptor):
        if not any(key in annotations for key in CHECKPOINT_ANNOTATIONS):
            return None
        if len(layers) != 1 or descriptor != layers[0] or descriptor.media_type != MEDIA_TYPE_LAYER_TAR:
            return None
        if store.has_unpacked_checkpoint(descriptor.digest):
            return None
        return CheckpointUnpackTap(store, descriptor, limits)
    return tap_for


class CheckpointUnpackTap:
    """Sees the bytes of one layer blob as they are downloaded; see the module docstring."""

    def __init__(self, store: ImageStore, descriptor: Descriptor, limits: Limits, scratch_parent: Path | None = None):
        self._store = store
        self._descriptor = descriptor
        self._limits = limits
        self._fed = 0
        self._pipe = _ChunkPipe(_PIPE_CHUNKS)
        # Under the store's tmp/, or under the caller's scratch directory there (receive_checkpoint_image).
        self._scratch = Path(tempfile.mkdtemp(dir=scratch_parent, prefix="checkpoint-pull-")) \
            if scratch_parent is not None else store.scratch_dir("checkpoint-pull-")
        self._images = self._scratch / "images"
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._unpack, name="checkpoint-pull-unpack", daemon=True)
        self._thread.start()

    def reading(self, stream: BinaryIO) -> BinaryIO:
        """`stream`, with every chunk read from it seen by this tap."""
        return TeeReader(stream, self)

    def write(self, chunk: bytes) -> None:
        self._fed += len(chunk)
        self._pipe.put(chunk)

    def complete(self) -> bool:
        """The blob is stored and verified: adopt the unpacked images if they are exactly its checkpoint/
        members. Returns whether they were adopted; never raises for the content (it is logged)."""
        self._pipe.close()
        self._thread.join()
        try:
            self._check_and_adopt()
            return True
        except Exception as e:  # noqa: BLE001 - the pull goes on; the blob is unpacked later instead
            log.warning("checkpoint image: the CRIU images unpacked during the download were discarded; "
                        "they are unpacked from the stored layer instead",
                        extra={"digest": self._descriptor.digest, "error": getattr(e, "message", str(e))})
            return False
        finally:
            self._discard()

    def abort(self) -> None:
        """The download failed: stop unpacking and leave nothing."""
        self._pipe.close(abandon=True)
        self._thread.join()
        self._discard()

    # ---- internals ------------------------------------------------------------------------------

    def _unpack(self) -> None:
        try:
            extract_checkpoint_images_from_stream(self._pipe, self._images, self._limits,
                                                  f"checkpoint layer {self._descriptor.digest}")
        except BaseException as e:  # noqa: BLE001 - reported by complete()
            self._error = e
        finally:
            self._pipe.close_reader()

    def _check_and_adopt(self) -> None:
        digest = self._descriptor.digest
        if self._error is not None:
            raise self._error if isinstance(self._error, (ArchiveError, OSError)) else \
                ArchiveError(f"unpacking checkpoint layer {digest} failed: {self._error!r}")
        if self._fed != self._descriptor.size:
            raise ArchiveError(f"unpacking checkpoint layer {digest} saw {self._fed} of its "
                               f"{self._descriptor.size} bytes")
        with open_archive(self._store.blob_path(digest), self._limits) as archive:
            expected = {m.name[len(_CHECKPOINT_PREFIX):]: (m.size if m.kind == "file" else None)
                        for m in archive.checkpoint_members()}
        unpacked = unpacked_files(self._images)
        if unpacked != expected:
            raise ArchiveError(f"the CRIU images unpacked from checkpoint layer {digest} are not the "
                               "checkpoint/ members of the stored layer")
        self._store.adopt_unpacked_checkpoint(digest, self._images)

    def _discard(self) -> None:
        remove_tree(self._scratch, ignore_errors=True)


def unpacked_files(root: Path) -> dict[str, int | None]:
    """relative path -> size for files, None for directories (what _checkpoint_members lists)."""
    found: dict[str, int | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames:
            found[os.path.normpath(os.path.join(rel, name))] = None
        for name in filenames:
            found[os.path.normpath(os.path.join(rel, name))] = os.lstat(os.path.join(dirpath, name)).st_size
    return found


def receive_checkpoint_image(store: ImageStore, stream: BinaryIO, tag: str, written: ArchiveDigest,
                             limits: Limits, scratch: Path | None = None,
                             on_stored: Callable[[], None] | None = None) -> ImageRecord:
    """A checkpoint archive read once from `stream` (e.g. piped from another node by `pyshim migrate
    --direct`) becomes the checkpoint image `tag` in `store`: stored as its layer blob, checked against
    `written` (the digest and size its writer computed), with its CRIU images unpacked in the same pass
    when it is a plain tar (a compressed one is unpacked from the blob at its first restore). Nothing is
    left in the store if anything fails. `scratch`: a store.scratch_dir() that receives every partial
    file (the blob being written, the images being unpacked), so that whoever journals the receive can
    remove them after a crash; `on_stored` is called once the blob is stored, before the image is
    recorded (the step where a crash leaves a whole blob that no image uses)."""
    try:
        tag = normalize_tag(tag)
    except ImageError as exc:
        raise CheckpointImageError(f"cannot tag a checkpoint image {tag!r}: {exc}") from None
    descriptor = Descriptor(MEDIA_TYPE_LAYER_TAR, written.digest, written.size)
    plain = written.diff_id == written.digest
    tap = CheckpointUnpackTap(store, descriptor, limits, scratch_parent=scratch) \
        if plain and not store.has_unpacked_checkpoint(written.digest) else None
    try:
        store.write_blob(tap.reading(stream) if tap else stream, written.digest, written.size, tmp_dir=scratch)
    except BaseException:
        if tap:
            tap.abort()
        raise
    try:
        if on_stored is not None:
            on_stored()
        if tap:
            tap.complete()
        documents = documents_for_written_archive(store.blob_path(written.digest), written, limits)
        return store.add_image(documents.manifest, documents.config, [tag])
    except BaseException:
        store.discard_unreferenced_blobs({written.digest})
        raise


class _ChunkPipe:
    """Bytes from the downloading thread to the unpacking thread, at most `capacity` chunks in between.

    The download never waits on an unpacking that has stopped (finished at the tar's end, or failed):
    what it puts then is dropped. read() is what tarfile's stream mode calls."""

    def __init__(self, capacity: int):
        self._chunks: deque[bytes] = deque()
        self._capacity = capacity
        self._cond = threading.Condition()
        self._closed = False      # no more writes: read() returns b"" once drained
        self._abandoned = False   # the download failed: read() ends at once
        self._reader_gone = False
        self._current = memoryview(b"")

    def put(self, chunk: bytes) -> None:
        with self._cond:
            while len(self._chunks) >= self._capacity and not self._reader_gone:
                self._cond.wait()
            if not self._reader_gone:
                self._chunks.append(chunk)
                self._cond.notify_all()

    def close(self, abandon: bool = False) -> None:
        with self._cond:
            self._closed = True
            self._abandoned = self._abandoned or abandon
            self._cond.notify_all()

    def close_reader(self) -> None:
        with self._cond:
            self._reader_gone = True
            self._chunks.clear()
            self._cond.notify_all()

    def read(self, size: int = -1) -> bytes:
        if not self._current:
            with self._cond:
                while not self._chunks and not self._closed:
                    self._cond.wait()
                if self._abandoned:
                    raise ArchiveError("the download of the checkpoint layer was interrupted")
                if not self._chunks:
                    return b""
                self._current = memoryview(self._chunks.popleft())
                self._cond.notify_all()
        if size < 0 or size >= len(self._current):
            data, self._current = self._current, memoryview(b"")
        else:
            data, self._current = self._current[:size], self._current[size:]
        return bytes(data)
