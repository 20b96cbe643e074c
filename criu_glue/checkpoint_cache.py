"""The CRIU images of a checkpoint, unpacked once into the image store and shared by every restore.

Restoring used to copy every CRIU image (the container's whole memory) out of the archive at each
StartContainer. Now a checkpoint's images are unpacked once into the store's
`checkpoints/<alg>/<hex>` entry (oci.store: read-only, written to tmp/ and renamed into place when
complete), and a restore gets its private images directory as hard links to those files. CRIU only
reads them; the one image pyshim rewrites (the UTS namespace's hostname) is replaced by a new file
in the private directory (criu_images.write_image), never written through the link.

Which entry belongs to a checkpoint:
- a checkpoint image's layer blob: the blob's digest. The store verified the blob against it when
  it was pulled or built, so the entry is filled from content of exactly that digest. Entries
  of this kind go with the blob (RemoveImage) and count in ImageFsInfo like the rest of the store.
- an archive named by path on the node: the sha256 of the archive file, computed while its images
  are first unpacked (in a thread next to the unpacking, so it costs no extra wall time on a
  machine with a spare core). The archive's identity -- device, inode, size, mtime and ctime of
  the very file that was opened and indexed -- is recorded with that digest in
  `checkpoint-archives/<key>.json` under the store root. A later restore from the same file reuses
  the entry only if the identity is unchanged: any write to the file changes its ctime (which,
  unlike mtime, nobody can set back), so a changed archive is unpacked again, never half-used.
  If the file changes while it is being unpacked, the restore is refused and nothing is kept.
  As the digest is that of the file's content, an archive and the checkpoint image built from it
  with `pyshim checkpoint-image build` (compression "keep": the layer is the archive's bytes)
  share one entry. At most MAX_ARCHIVE_ENTRIES archive entries are kept (least recently used go
  first), and entries of archives that changed or vanished are dropped.

The untrusted-input rules of a restore hold unchanged: an entry is filled by
CheckpointArchive.extract_checkpoint_images (regular files and directories only, validated names,
size budget of the restore's limits, i.e. bounded by the free space too).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from oci.store import ImageRecord, ImageStore

from .archive import CheckpointArchive, open_archive
from .errors import ArchiveError, ArchiveFormatError
from .limits import Limits

log = logging.getLogger(__name__)

ARCHIVE_INDEX_DIR = "checkpoint-archives"
MAX_ARCHIVE_ENTRIES = 4


@dataclass(frozen=True)
class CachedImages:
    digest: str        # the entry's key: the blob's or the archive file's sha256
    path: Path         # the read-only entry in the store
    image_bytes: int   # bytes of CRIU images in it
    unpacked: bool     # True: this call unpacked them; False: they were already there


class CheckpointCache:
    def __init__(self, store: ImageStore, max_archive_entries: int = MAX_ARCHIVE_ENTRIES):
        self._store = store
        self._index = store.root / ARCHIVE_INDEX_DIR
        self._index.mkdir(mode=0o700, exist_ok=True)
        self._max_archive_entries = max_archive_entries
        self._index_lock = threading.Lock()

    # ---- what restore and pull call ------------------------------------------------------------

    def images_of(self, archive: CheckpointArchive, limits: Limits = Limits()) -> CachedImages:
        """The entry holding `archive`'s CRIU images, unpacked now if there is none yet."""
        digest = self._store.blob_digest_of_path(archive.path)
        if digest is not None:
            return self._of_blob(digest, archive, limits)
        return self._of_archive_file(archive, limits)

    def unpack_image(self, image: ImageRecord, limits: Limits = Limits()) -> CachedImages:
        """At PullImage of a checkpoint image: its layer's CRIU images into the store now, so that a
        restore only links them. ArchiveError if the layer is not a usable checkpoint archive."""
        if len(image.layers) != 1:
            raise ArchiveFormatError(image.id, f"a checkpoint image has exactly one layer, this one "
                                               f"{len(image.layers)}")
        with open_archive(self._store.blob_path(image.layers[0].digest), limits) as archive:
            return self.images_of(archive, limits)

    def link(self, cached: CachedImages, dest: Path) -> None:
        """`dest` (empty or absent) gets hard links to every image of the entry."""
        if not self._store.link_unpacked_checkpoint(cached.digest, dest):
            raise ArchiveError(f"the unpacked checkpoint {cached.digest} was removed from the image store "
                               "while a restore used it (its image was removed?); try again")

    # ---- checkpoint images ---------------------------------------------------------------------

    def _of_blob(self, digest: str, archive: CheckpointArchive, limits: Limits) -> CachedImages:
        if self._store.has_unpacked_checkpoint(digest):
            path = self._store.unpacked_checkpoint_path(digest)
            return CachedImages(digest, path, _tree_bytes(path), unpacked=False)
        unpacked = {}

        def fill(tmp: Path) -> str:
            unpacked["bytes"] = archive.extract_checkpoint_images(tmp, limits)
            return digest

        path = self._store.add_unpacked_checkpoint(digest, fill)
        return CachedImages(digest, path, unpacked.get("bytes", _tree_bytes(path)), unpacked=bool(unpacked))

    # ---- archives on the node ------------------------------------------------------------------

    def _of_archive_file(self, archive: CheckpointArchive, limits: Limits) -> CachedImages:
        opened = archive.file_stat()
        identity = _identity(opened)
        index_file = self._index / f"{_identity_key(opened)}.json"
        known = _read_index(index_file)
        if known is not None and known.get("identity") == identity:
            digest = str(known.get("digest", ""))
            if digest and self._store.has_unpacked_checkpoint(digest):
                os.utime(index_file)  # recently used: pruned last
                path = self._store.unpacked_checkpoint_path(digest)
                return CachedImages(digest, path, _tree_bytes(path), unpacked=False)
        unpacked = {}

        def fill(tmp: Path) -> str:
            hashing = _BackgroundDigest(archive)
            try:
                unpacked["bytes"] = archive.extract_checkpoint_images(tmp, limits)
            finally:
                digest = hashing.result()
            if _identity(archive.file_stat()) != identity:
                raise ArchiveFormatError(str(archive.path), "changed while its CRIU images were unpacked; "
                                         "restore again from a finished archive")
            return digest

        path = self._store.add_unpacked_checkpoint(None, fill)
        digest = f"{path.parent.name}:{path.name}"
        self._record(index_file, archive.path, identity, digest)
        # The file's previous content, cached under the same identity key, is stale now.
        stale = known.get("digest") if known is not None and known.get("digest") != digest else None
        self._prune(stale)
        return CachedImages(digest, path, unpacked.get("bytes", _tree_bytes(path)), unpacked=bool(unpacked))

    def _record(self, index_file: Path, archive_path: Path, identity: list[int], digest: str) -> None:
        doc = {"archive": str(archive_path), "identity": identity, "digest": digest}
        fd, tmp = tempfile.mkstemp(dir=self._index, prefix=".index-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, index_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _prune(self, stale_digest: str | None = None) -> None:
        """Drop the entries of archives that changed or vanished, then the least recently used
        beyond MAX_ARCHIVE_ENTRIES. An entry a checkpoint image's blob uses stays (the store keeps
        it for the image)."""
        with self._index_lock:
            indexes = []
            for index_file in self._index.glob("*.json"):
                doc = _read_index(index_file)
                try:
                    used = index_file.stat().st_mtime_ns
                except FileNotFoundError:
                    continue
                indexes.append((used, index_file, doc))
            indexes.sort(key=lambda item: item[0], reverse=True)
            kept, dropped = [], []
            for used, index_file, doc in indexes:
                current = doc is not None and _current_identity(doc.get("archive", "")) == doc.get("identity")
                (kept if current and len(kept) < self._max_archive_entries else dropped).append((index_file, doc))
            still_wanted = {doc.get("digest") for _, doc in kept}
            for index_file, _ in dropped:
                index_file.unlink(missing_ok=True)
            for digest in {(doc or {}).get("digest") for _, doc in dropped} | {stale_digest}:
                if isinstance(digest, str) and digest and digest not in still_wanted:
                    try:
                        self._store.remove_unpacked_checkpoint(digest)
                    except Exception as e:  # noqa: BLE001 - pruning must not fail a restore
                        log.warning("cannot drop the unpacked checkpoint %s: %s", digest, e)


class _BackgroundDigest:
    """sha256 of the archive file, computed in a thread from its own handle on the same inode
    (hashlib releases the GIL: on a second core it costs no wall time next to the unpacking)."""

    def __init__(self, archive: CheckpointArchive):
        self._handle = archive.reopen()
        self._digest = ""
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-digest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self._handle:
                self._digest = "sha256:" + hashlib.file_digest(self._handle, "sha256").hexdigest()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self._error = e

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise ArchiveError(f"cannot hash the checkpoint archive: {self._error}")
        return self._digest


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _identity_key(st: os.stat_result) -> str:
    return hashlib.sha256(f"{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:32]


def _current_identity(path: str) -> list[int] | None:
    try:
        return _identity(os.stat(path))
    except (OSError, ValueError):
        return None


def _read_index(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total

