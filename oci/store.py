"""The local image store: content-addressed blobs, image records, and unpacked layers.

On disk, under `root`:
    blobs/<alg>/<hex>         manifests, configs and layer blobs, verified against their digest
    layers/<alg>/<diff hex>   each layer unpacked once (overlay format), shared between images
    checkpoints/<alg>/<hex>   the CRIU images of a checkpoint, unpacked once from the blob (or
                              checkpoint archive) of that digest: read-only, shared by every
                              restore through hard links, removed with the last image using the
                              blob (criu_glue.checkpoint_cache fills and uses them)
    images.json               which images exist and their tags; everything else is derived
                              from the blobs, so this file stays small and is rewritten atomically
    tmp/                      partial blobs and unpacks, renamed into place only when complete
    tmp/private-<pid>-<x>/    the same, of one process that asked for its own (private_tmp): removed
                              by any opener of the store once that process is gone, even killed
    unsynced/<alg>-<hex>      a blob not yet complete nor synced (a checkpoint received for a move:
                              its CRIU images' bytes are copied in from the unpacked entry, and
                              synced, after the restore); checked at start-up

    images.lock               flock held (exclusively) around every change to images.json
    users.lock                flock every open store holds shared for its lifetime

Several processes may share a root: the daemon, and `pyshim image import` / `pyshim
checkpoint-image build` writing the same store while it runs. Every read-modify-write of
images.json happens under an exclusive flock on images.lock after re-reading the file, and
every lookup first re-reads images.json if another process replaced it since, so what one
process adds the others see at their next get()/list() without a restart. "Replaced" is
judged by comparing the file's (st_dev, st_ino, st_size, st_mtime_ns) with those of the copy
last read; that copy is kept open, so its inode number cannot be reused by a newer file and
even a same-size rewrite within one clock tick is noticed. Stale tmp/ entries (a crash
mid-download) are cleared at start-up only by a process that finds itself the root's sole
user (an exclusive users.lock), never under another process's in-flight download. Within a
process every method is thread-safe.

Manifest and index parsing lives here too: the store is what interprets stored manifests, and
the registry client and layout importer reuse the same parser.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from .digest import CHUNK_SIZE, digest_of, new_hasher, split_digest, verify_digest
from .errors import DigestMismatch, ImageError, ImageNotFound, InvalidReference
from .image_config import ImageConfig
from .layers import LAYER_MEDIA_TYPES, unpack_layer
from .reference import Reference

log = logging.getLogger(__name__)

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPE_DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_MEDIA_TYPES = (MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST)
INDEX_MEDIA_TYPES = (MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST)
CONFIG_MEDIA_TYPES = (MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_DOCKER_CONFIG)

# Manifests and configs are read whole into memory; bound them so a hostile server can't OOM us.
MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 16 << 20

_STATE_FILE = "images.json"
_LOCK_FILE = "images.lock"
_USERS_FILE = "users.lock"
_UNSYNCED_DIR = "unsynced"
_PRIVATE_TMP_PREFIX = "private-"
_PRIVATE_TMP_LOCK = ".owner.lock"
# Lookups that race with another process's remove (which deletes blobs right after rewriting
# images.json) re-read the newer images.json instead of reporting the half-removed image.
_REFRESH_ATTEMPTS = 5
_STATE_VERSION = 1
_HEX_RE = re.compile(r"^[a-f0-9]+$")
_MIN_ID_PREFIX = 12


# ---------------------------------------------------------------- manifests and indexes

@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


DEFAULT_PLATFORM = Platform("linux", "amd64")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    @classmethod
    def from_json(cls, doc: dict, context: str) -> "Descriptor":
        try:
            digest = doc["digest"]
            split_digest(digest)
            size = int(doc["size"])
        except (KeyError, TypeError, ValueError, ImageError) as exc:
            raise ImageError(f"{context}: malformed descriptor {doc!r}: {exc}") from exc
        if size < 0:
            raise ImageError(f"{context}: descriptor {digest} has negative size")
        plat = doc.get("platform")
        platform = (Platform(plat.get("os", ""), plat.get("architecture", ""), plat.get("variant", ""))
                    if isinstance(plat, dict) else None)
        return cls(doc.get("mediaType", ""), digest, size, dict(doc.get("annotations") or {}), platform)

    def to_json(self) -> dict:
        doc: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        if self.platform:
            doc["platform"] = {"os": self.platform.os, "architecture": self.platform.architecture}
            if self.platform.variant:
                doc["platform"]["variant"] = self.platform.variant
        return doc


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str]


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: list[Descriptor]
    annotations: dict[str, str]


def _load_json_object(raw: bytes, context: str) -> dict:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{context}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ImageError(f"{context}: expected a JSON object")
    return doc


def detect_media_type(raw: bytes, declared: str = "", context: str = "manifest") -> str:
    """Media type of a manifest-ish document: its own mediaType field, else the transport's, else its shape.

    OCI makes the mediaType field optional, so an OCI manifest or index is recognised by
    whether it has "manifests" or "config".
    """
    doc = _load_json_object(raw, context)
    if doc.get("mediaType"):
        return doc["mediaType"]
    if doc.get("schemaVersion") == 1:
        return MEDIA_TYPE_DOCKER_SCHEMA1
    if declared and declared not in ("application/json", "text/plain"):
        return declared
    if "manifests" in doc:
        return MEDIA_TYPE_OCI_INDEX
    if "config" in doc:
        return MEDIA_TYPE_OCI_MANIFEST
    raise ImageError(f"{context}: cannot tell what kind of document this is")


def parse_manifest(raw: bytes, context: str = "manifest") -> Manifest:
    doc = _load_json_object(raw, context)
    media_type = doc.get("mediaType") or MEDIA_TYPE_OCI_MANIFEST
    if media_type in (MEDIA_TYPE_DOCKER_SCHEMA1, MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED) or doc.get("schemaVersion") == 1:
        raise ImageError(f"{context}: Docker schema 1 manifests are not supported (push the image again "
                         "with a current client)")
    if media_type not in MANIFEST_MEDIA_TYPES:
        raise ImageError(f"{context}: unsupported manifest media type {media_type!r}")
    if doc.get("schemaVersion") != 2:
        raise ImageError(f"{context}: schemaVersion is {doc.get('schemaVersion')!r}, expected 2")
    if not isinstance(doc.get("config"), dict) or not isinstance(doc.get("layers", []), list):
        raise ImageError(f"{context}: manifest lacks a config descriptor or a layers list")
    config = Descriptor.from_json(doc["config"], context)
    if config.media_type and config.media_type not in CONFIG_MEDIA_TYPES:
        raise ImageError(f"{context}: config media type {config.media_type!r} is not a container "
                         "image config (an artifact, not a runnable image?)")
    layers = [Descriptor.from_json(d, context) for d in doc.get("layers") or []]
    for layer in layers:
        if layer.media_type not in LAYER_MEDIA_TYPES:
            raise ImageError(f"{context}: layer {layer.digest} has unsupported media type "
                             f"{layer.media_type!r}")
    return Manifest(media_type, config, layers, dict(doc.get("annotations") or {}))


def parse_index(raw: bytes, context: str = "index") -> Index:
    doc = _load_json_object(raw, context)
    media_type = doc.get("mediaType") or MEDIA_TYPE_OCI_INDEX
    if media_type not in INDEX_MEDIA_TYPES:
        raise ImageError(f"{context}: unsupported index media type {media_type!r}")
    if not isinstance(doc.get("manifests"), list):
        raise ImageError(f"{context}: index has no manifests list")
    manifests = [Descriptor.from_json(d, context) for d in doc["manifests"]]
    return Index(media_type, manifests, dict(doc.get("annotations") or {}))


def select_platform(index: Index, platform: Platform, context: str = "index") -> Descriptor:
    """The manifest for `platform`, preferring entries without a CPU variant.

    Attestation manifests (platform unknown/unknown) never match, which is what we want.
    """
    candidates = [d for d in index.manifests
                  if d.platform and d.platform.os == platform.os
                  and d.platform.architecture == platform.architecture
                  and (not platform.variant or d.platform.variant == platform.variant)]
    if not candidates:
        offered = ", ".join(str(d.platform) for d in index.manifests if d.platform) or "none"
        raise ImageError(f"{context}: no manifest for platform {platform} (offered: {offered})")
    candidates.sort(key=lambda d: d.platform.variant not in ("", "v1"))
    return candidates[0]


# ---------------------------------------------------------------- records

@dataclass(frozen=True)
class LayerRef:
    digest: str
    diff_id: str
    media_type: str
    size: int


@dataclass(frozen=True)
class ImageRecord:
    id: str
    repo_tags: list[str]
    repo_digests: list[str]
    manifest_digest: str
    config: ImageConfig
    layers: list[LayerRef]
    size: int
    annotations: dict[str, str]
    config_digest: str = ""
    manifest_media_type: str = ""

    def blob_digests(self) -> set[str]:
        return {self.manifest_digest, self.config_digest, *(layer.digest for layer in self.layers)}


@dataclass
class _StoredImage:
    """What images.json remembers about one image; the rest comes from its blobs."""
    id: str
    manifest_digest: str
    repo_tags: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)
    index_annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"manifest_digest": self.manifest_digest, "repo_tags": self.repo_tags,
                "repo_digests": self.repo_digests, "index_annotations": self.index_annotations}

    @classmethod
    def from_json(cls, image_id: str, doc: dict) -> "_StoredImage":
        return cls(image_id, doc["manifest_digest"], list(doc.get("repo_tags") or []),
                   list(doc.get("repo_digests") or []), dict(doc.get("index_annotations") or {}))


def normalize_tag(tag: str) -> str:
    ref = Reference.parse(tag)
    if ref.digest or not ref.tag:
        raise InvalidReference(tag, "a tag reference (name:tag) is needed here, not a digest")
    return str(ref)


def normalize_repo_digest(repo_digest: str) -> str:
    ref = Reference.parse(repo_digest)
    if not ref.digest:
        raise InvalidReference(repo_digest, "a digest reference (name@sha256:...) is needed here")
    return f"{ref.name}@{ref.digest}"


def _record_from(stored: _StoredImage, manifest_bytes: bytes, config_bytes: bytes) -> ImageRecord:
    context = f"image {stored.id}"
    manifest = parse_manifest(manifest_bytes, f"{context} manifest {stored.manifest_digest}")
    config = ImageConfig.from_json(_load_json_object(config_bytes, f"{context} config"))
    if len(config.diff_ids) != len(manifest.layers):
        raise ImageError(f"{context}: config lists {len(config.diff_ids)} diff_ids but the "
                         f"manifest has {len(manifest.layers)} layers")
    layers = [LayerRef(d.digest, diff_id, d.media_type, d.size)
              for d, diff_id in zip(manifest.layers, config.diff_ids)]
    for layer in layers:
        split_digest(layer.diff_id)
    return ImageRecord(
        id=stored.id,
        repo_tags=list(stored.repo_tags),
        repo_digests=list(stored.repo_digests),
        manifest_digest=stored.manifest_digest,
        config=config,
        layers=layers,
        size=len(manifest_bytes) + len(config_bytes) + sum(layer.size for layer in layers),
        annotations={**stored.index_annotations, **manifest.annotations},
        config_digest=manifest.config.digest,
        manifest_media_type=manifest.media_type,
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the store

class ImageStore:
    def __init__(self, root: Path, private_tmp: bool = False):
        """`private_tmp`: this process's partial files go to a directory of its own, which any later
        opener removes once this process is gone -- for a short-lived writer beside a long-running
        daemon (`checkpoint-image receive`), whose leftovers after a kill would otherwise stay until
        the store's next sole user."""
        self.root = Path(root)
        self._blobs = self.root / "blobs"
        self._layers = self.root / "layers"
        self._checkpoints = self.root / "checkpoints"
        self._tmp = self.root / "tmp"
        self._state_path = self.root / _STATE_FILE
        self._lock = threading.RLock()
        self._unpack_locks: dict[str, threading.Lock] = {}
        for d in (self.root, self._blobs, self._layers, self._checkpoints):
            d.mkdir(parents=True, exist_ok=True)
        self._images: dict[str, _StoredImage] = {}
        self._records: dict[str, ImageRecord] = {}
        # The images.json last read or written (kept open: see the module docstring) and its
        # signature; a signature that failed to load is remembered so it is not re-read per call.
        self._state_fd: int | None = None
        self._state_sig: tuple | None = None
        self._bad_state: tuple[tuple, ImageError] | None = None
        self._flock_depth = 0
        self._lock_fd = _open_lock_file(self.root / _LOCK_FILE)
        self._users_fd = _open_lock_file(self.root / _USERS_FILE)
        self._private_tmp_fd: int | None = None
        try:
            sole_user = self._claim_tmp()
            self._remove_abandoned_private_tmps()
            if private_tmp:
                self._tmp = self._make_private_tmp()
            with self._lock:
                self._refresh(strict=True)
            if sole_user:
                self._recover_unsynced()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the lock files and the held images.json (the store is unusable afterwards)."""
        if getattr(self, "_private_tmp_fd", None) is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        for name in ("_state_fd", "_lock_fd", "_users_fd", "_private_tmp_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; the fds go with the process
            pass

    def _claim_tmp(self) -> bool:
        """Clear leftovers of a crash mid-download or mid-unpack (never renamed in, so never
        referenced) when no other process uses this root, then stay registered as a user.
        Returns whether this process was the sole user."""
        try:
            fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            sole_user = True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            sole_user = False
        if sole_user:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(exist_ok=True)
        fcntl.flock(self._users_fd, fcntl.LOCK_SH)
        return sole_user

    def _make_private_tmp(self) -> Path:
        """tmp/private-<pid>-<x>/, its lock file flocked for this store's lifetime. Made under another
        name and renamed once locked, so that no opener ever sees it unlocked while its owner lives."""
        staging = Path(tempfile.mkdtemp(dir=self._tmp, prefix=".staging-"))
        fd = os.open(staging / _PRIVATE_TMP_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._private_tmp_fd = fd
        private = self._tmp / f"{_PRIVATE_TMP_PREFIX}{os.getpid()}-{staging.name.removeprefix('.staging-')}"
        os.rename(staging, private)
        return private

    def _remove_abandoned_private_tmps(self) -> None:
        """Private tmp directories whose owner is gone (its flock was released with its last fd)."""
        for private in self._tmp.glob(f"{_PRIVATE_TMP_PREFIX}*"):
            try:
                fd = os.open(private / _PRIVATE_TMP_LOCK, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue  # being removed by another opener
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # its owner lives
            try:
                shutil.rmtree(private, ignore_errors=True)
                log.info("image store %s: removed %s, left by a process that is gone", self.root, private.name)
            finally:
                os.close(fd)

    # ------------------------------------------------------------ blobs

    def blob_path(self, digest: str) -> Path:
        algorithm, hexpart = split_digest(digest)
        return self._blobs / algorithm / hexpart

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str, limit: int = MAX_CONFIG_SIZE) -> bytes:
        """A small blob (manifest, config) as bytes; large ones must be streamed from blob_path."""
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise ImageError(f"blob {digest} is not in the store at {self.root}") from None
        if len(data) > limit:
            raise ImageError(f"blob {digest} is larger than {limit} bytes; refusing to read it whole")
        return data

    def write_blob(self, stream: BinaryIO, expected_digest: str | None = None,
                   expected_size: int | None = None, tmp_dir: Path | None = None) -> str:
        """Stream `stream` into the store, verify it, and return its digest.

        When `expected_digest` is already stored, the stream is left unread. `tmp_dir`: a scratch_dir()
        to write the partial blob in, for a caller that must find it after a crash.
        """
        if expected_digest and self.has_blob(expected_digest):
            return expected_digest
        algorithm, hasher = new_hasher(expected_digest)
        fd, tmp_name = tempfile.mkstemp(dir=tmp_dir or self._tmp, prefix="blob-")
        tmp = Path(tmp_name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK_SIZE):
                    size += len(chunk)
                    if expected_size is not None and size > expected_size:
                        raise DigestMismatch(f"size of blob {expected_digest or '(unknown)'}",
                                             str(expected_size), f"more than {expected_size}")
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = f"{algorithm}:{hasher.hexdigest()}"
            if expected_size is not None and size != expected_size:
                raise DigestMismatch(f"size of blob {expected_digest or digest}", str(expected_size), str(size))
            if expected_digest and digest != expected_digest:
                raise DigestMismatch(f"blob {expected_digest}", expected_digest, digest)
            final = self.blob_path(digest)
            final.parent.mkdir(exist_ok=True)
            os.chmod(tmp, 0o644)
            os.rename(tmp, final)
            return digest
        finally:
            tmp.unlink(missing_ok=True)

    def write_blob_bytes(self, data: bytes, expected_digest: str | None = None) -> str:
        return self.write_blob(io.BytesIO(data), expected_digest, len(data))

    def new_blob_file(self) -> tuple[int, Path]:
        """A private temporary file under tmp/ (fd, path) for a blob its caller writes itself."""
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix="blob-")
        return fd, Path(name)

    def adopt_blob_file(self, tmp: Path, digest: str) -> None:
        """Rename the new_blob_file() `tmp` into place as the blob `digest` (an existing blob of that
        digest is kept, and `tmp` removed). Only for a caller that hashed exactly the content it
        stands for, and that marked it unsynced (mark_unsynced) first if the file is not complete
        yet: it must then complete it and sync_blob() it."""
        final = self.blob_path(digest)
        try:
            if final.is_file():
                return
            final.parent.mkdir(exist_ok=True)
            os.chmod(tmp, 0o644)
            os.rename(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------ blobs synced later

    def mark_unsynced(self, digest: str) -> None:
        """Record, durably, that the blob `digest` (written by its caller, not complete or not synced)
        and its unpacked checkpoint entry may not be on disk yet. Call it before the blob is visible
        under its digest: after a crash, the next sole opener of the store checks it (_recover_unsynced)."""
        marker = self._unsynced_marker(digest)
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
        _fsync_dir(marker.parent)

    def sync_blob(self, digest: str) -> None:
        """fsync the blob `digest` and its unpacked checkpoint entry, then forget its marker."""
        paths = [self.blob_path(digest)]
        entry = self.unpacked_checkpoint_path(digest)
        for dirpath, _, filenames in os.walk(entry):
            paths += [Path(dirpath, name) for name in filenames] + [Path(dirpath)]
        paths += [self.blob_path(digest).parent, entry.parent]
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # removed meanwhile (RemoveImage): nothing to make durable
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._unsynced_marker(digest).unlink(missing_ok=True)

    def _unsynced_marker(self, digest: str) -> Path:
        algorithm, hexpart = split_digest(digest)
        return self.root / _UNSYNCED_DIR / f"{algorithm}-{hexpart}"

    def _recover_unsynced(self) -> None:
        """At the start of the root's sole user: blobs marked unsynced whose writer did not finish
        (a host crash, a killed receiver). A blob that still matches its digest is synced; one that
        does not is removed with the images recording it. Their unpacked checkpoint entries are
        dropped either way (their files may not have reached the disk; a restore unpacks the blob
        again)."""
        markers = self.root / _UNSYNCED_DIR
        if not markers.is_dir():
            return
        for marker in sorted(markers.iterdir()):
            algorithm, _, hexpart = marker.name.partition("-")
            digest = f"{algorithm}:{hexpart}"
            try:
                split_digest(digest)
            except ImageError:
                marker.unlink(missing_ok=True)
                continue
            self._remove_unpacked_checkpoint(digest)
            if self.blob_matches(digest):
                self.sync_blob(digest)
                log.warning("image store %s: blob %s was not synced before a crash; it is intact and "
                            "synced now", self.root, digest)
                continue
            with self._exclusive():
                for record in [r for r in self._records.values() if digest in r.blob_digests()]:
                    self.remove(record.id)
                self.blob_path(digest).unlink(missing_ok=True)
            log.warning("image store %s: blob %s was not synced before a crash and is damaged; it was "
                        "removed with the images recording it", self.root, digest)
            marker.unlink(missing_ok=True)

    def blob_matches(self, digest: str) -> bool:
        """Whether the stored blob's content hashes to `digest` (reads it whole)."""
        algorithm, hasher = new_hasher(digest)
        try:
            with open(self.blob_path(digest), "rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    hasher.update(chunk)
        except FileNotFoundError:
            return False
        return f"{algorithm}:{hasher.hexdigest()}" == digest

    # ------------------------------------------------------------ images

    def add_image(self, manifest_bytes: bytes, config_bytes: bytes, tags: list[str] | tuple = (),
                  repo_digests: list[str] | tuple = (),
                  index_annotations: dict[str, str] | None = None) -> ImageRecord:
        """Record an image whose layer blobs are already stored; tags move here from other images."""
        manifest_digest = digest_of(manifest_bytes)
        manifest = parse_manifest(manifest_bytes, f"manifest {manifest_digest}")
        verify_digest(f"config of manifest {manifest_digest}", manifest.config.digest, config_bytes)
        self._check_layers_present(manifest_digest, manifest)
        tags = [normalize_tag(t) for t in tags]
        repo_digests = [normalize_repo_digest(d) for d in repo_digests]
        image_id = "sha256:" + split_digest(manifest.config.digest)[1]
        stored = _StoredImage(image_id, manifest_digest, [], [], dict(index_annotations or {}))
        # Validate config against manifest before anything is written: no orphans on failure.
        _record_from(stored, manifest_bytes, config_bytes)
        self.write_blob_bytes(manifest_bytes, manifest_digest)
        self.write_blob_bytes(config_bytes, manifest.config.digest)

        with self._exclusive():
            # Again under the lock: another process's remove may have collected a shared blob
            # between our download and now.
            self._check_layers_present(manifest_digest, manifest)
            for digest in (manifest_digest, manifest.config.digest):
                if not self.has_blob(digest):
                    raise ImageError(f"image {manifest_digest}: blob {digest} was removed from "
                                     "the store while the image was being added; try again")
            previous = self._images.get(image_id)
            if previous:
                stored.repo_tags = list(previous.repo_tags)
                stored.repo_digests = list(previous.repo_digests)
                if not index_annotations:
                    stored.index_annotations = previous.index_annotations
            for tag in tags:
                self._untag_everywhere(tag)
            stored.repo_tags += [t for t in tags if t not in stored.repo_tags]
            stored.repo_digests += [d for d in repo_digests if d not in stored.repo_digests]
            old_record = self._records.get(image_id)
            self._images[image_id] = stored
            self._records[image_id] = _record_from(stored, manifest_bytes, config_bytes)
            self._save_state()
            if old_record and old_record.manifest_digest != manifest_digest:
                self._collect_garbage(old_record)
            return self._records[image_id]

    def get(self, ref_or_id: str) -> ImageRecord | None:
        """Look up by id, name[:tag], name@digest, or an unambiguous id prefix (>= 12 hex chars)."""
        key = (ref_or_id or "").strip()
        if not key:
            return None
        with self._lock:
            self._refresh(strict=False)
            image_id = (self._find_by_id(key) or self._find_by_reference(key)
                        or self._find_by_id_prefix(key))
            return self._records.get(image_id) if image_id else None

    def list(self) -> list[ImageRecord]:
        with self._lock:
            self._refresh(strict=False)
            return sorted(self._records.values(), key=lambda r: r.id)

    def tag(self, image_id: str, ref: str) -> ImageRecord:
        tag = normalize_tag(ref)
        with self._exclusive():
            record = self.get(image_id)
            if record is None:
                raise ImageNotFound(image_id, f"cannot tag it as {tag}")
            self._untag_everywhere(tag)
            stored = self._images[record.id]
            stored.repo_tags.append(tag)
            self._refresh_names(stored)
            self._save_state()
            return self._records[record.id]

    def remove(self, ref_or_id: str) -> bool:
        """Forget an image with all its tags, then delete blobs and layers nothing else uses."""
        with self._exclusive():
            record = self.get(ref_or_id)
            if record is None:
                return False
            del self._images[record.id]
            del self._records[record.id]
            self._save_state()
            self._collect_garbage(record)
            return True

    def manifest_bytes(self, image: ImageRecord) -> bytes:
        return self.read_blob(image.manifest_digest, MAX_MANIFEST_SIZE)

    def config_bytes(self, image: ImageRecord) -> bytes:
        return self.read_blob(image.config_digest, MAX_CONFIG_SIZE)

    # ------------------------------------------------------------ layers

    def layer_paths(self, image: ImageRecord) -> list[Path]:
        """Unpacked layer directories bottom -> top, unpacking each on first use."""
        return [self._ensure_unpacked(layer) for layer in image.layers]

    def layer_path(self, layer: LayerRef) -> Path:
        algorithm, hexpart = split_digest(layer.diff_id)
        return self._layers / algorithm / hexpart

    def _ensure_unpacked(self, layer: LayerRef) -> Path:
        path = self.layer_path(layer)
        if path.is_dir():
            return path
        with self._lock:
            unpack_lock = self._unpack_locks.setdefault(layer.diff_id, threading.Lock())
        with unpack_lock:
            if not path.is_dir():
                self._unpack(layer, path)
        return path

    def _unpack(self, layer: LayerRef, path: Path) -> None:
        blob = self.blob_path(layer.digest)
        if not blob.is_file():
            raise ImageError(f"layer {layer.digest} (diff {layer.diff_id}) has no blob in the store")
        tmp = Path(tempfile.mkdtemp(dir=self._tmp, prefix="unpack-"))
        try:
            diff_id = unpack_layer(blob, layer.media_type, tmp)
            if diff_id != layer.diff_id:
                raise DigestMismatch(f"uncompressed layer {layer.digest}", layer.diff_id, diff_id)
            _publish_dir(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------ unpacked checkpoints

    def blob_digest_of_path(self, path: Path) -> str | None:
        """The digest of the stored blob at `path`, None if `path` is not a blob of this store."""
        path = Path(path)
        try:
            relative = path.relative_to(self._blobs)
        except ValueError:
            return None
        parts = relative.parts
        if len(parts) != 2 or not _HEX_RE.match(parts[1]):
            return None
        digest = f"{parts[0]}:{parts[1]}"
        return digest if self.blob_path(digest) == path else None

    def unpacked_checkpoint_path(self, digest: str) -> Path:
        algorithm, hexpart = split_digest(digest)
        return self._checkpoints / algorithm / hexpart

    def has_unpacked_checkpoint(self, digest: str) -> bool:
        return self.unpacked_checkpoint_path(digest).is_dir()

    def add_unpacked_checkpoint(self, digest: str | None, fill) -> Path:
        """The entry of `digest`, made by `fill(tmp_dir)` if it does not exist yet.

        `fill` writes into an empty private directory under tmp/ and returns the entry's digest
        (the content's, which it may only learn as it reads: then `digest` is None). Only when
        it returns is the directory made read-only (files 0444) and renamed into place, so a
        failed or interrupted fill leaves nothing that could be used (tmp/ is cleared at the next
        start). An entry that already exists is kept and the new one discarded."""
        if digest is not None and self.has_unpacked_checkpoint(digest):
            return self.unpacked_checkpoint_path(digest)
        with self._lock:
            unpack_lock = self._unpack_locks.setdefault(f"checkpoint {digest}", threading.Lock()) \
                if digest is not None else threading.Lock()
        with unpack_lock:
            if digest is not None and self.has_unpacked_checkpoint(digest):
                return self.unpacked_checkpoint_path(digest)
            tmp = self.scratch_dir("checkpoint-")
            try:
                filled = fill(tmp)
                if digest is not None and filled != digest:
                    raise DigestMismatch(f"unpacked checkpoint {digest}", digest, str(filled))
                return self._publish_unpacked_checkpoint(tmp, filled)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)

    def scratch_dir(self, prefix: str) -> Path:
        """A new private directory under tmp/ (cleared at the next start if it is left behind)."""
        return Path(tempfile.mkdtemp(dir=self._tmp, prefix=prefix))

    def adopt_unpacked_checkpoint(self, digest: str, filled: Path) -> Path:
        """Make `filled`, a scratch_dir() its caller filled with the CRIU images of the blob `digest`
        (e.g. while that blob downloaded), the entry of `digest`; it is moved, or removed if an entry
        exists already. Only a caller that checked the content against the stored blob may do this."""
        with self._lock:
            unpack_lock = self._unpack_locks.setdefault(f"checkpoint {digest}", threading.Lock())
        with unpack_lock:
            try:
                if self.has_unpacked_checkpoint(digest):
                    return self.unpacked_checkpoint_path(digest)
                return self._publish_unpacked_checkpoint(filled, digest)
            finally:
                if filled.exists():
                    shutil.rmtree(filled, ignore_errors=True)

    def _publish_unpacked_checkpoint(self, tmp: Path, digest: str) -> Path:
        """Read-only (files 0444), then renamed into place in one step."""
        path = self.unpacked_checkpoint_path(digest)
        for dirpath, _, filenames in os.walk(tmp):
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(tmp, 0o755)
        _publish_dir(tmp, path)
        return path

    def link_unpacked_checkpoint(self, digest: str, dest: Path) -> bool:
        """Hard-link every file of the entry of `digest` into the empty directory `dest` (copies
        where the filesystems differ). False if there is no entry. Held against a concurrent
        remove of the entry (this process's or another's), so a link set is never partial."""
        with self._exclusive():
            source = self.unpacked_checkpoint_path(digest)
            if not source.is_dir():
                return False
            _link_tree(source, Path(dest))
            return True

    def remove_unpacked_checkpoint(self, digest: str) -> None:
        """Delete the entry of `digest` unless an image's blob of that digest still needs it."""
        with self._exclusive():
            if any(digest in record.blob_digests() for record in self._records.values()):
                return
            self._remove_unpacked_checkpoint(digest)

    def unpacked_checkpoints(self) -> list[str]:
        """The digests that have an entry."""
        return sorted(f"{alg.name}:{entry.name}" for alg in self._checkpoints.iterdir() if alg.is_dir()
                      for entry in alg.iterdir() if entry.is_dir())

    def _remove_unpacked_checkpoint(self, digest: str) -> None:
        with self._lock:
            unpack_lock = self._unpack_locks.setdefault(f"checkpoint {digest}", threading.Lock())
        with unpack_lock:
            shutil.rmtree(self.unpacked_checkpoint_path(digest), ignore_errors=True)

    # ------------------------------------------------------------ filesystem info

    @property
    def mountpoint(self) -> Path:
        return self.root

    def usage(self) -> tuple[int, int]:
        """(bytes, inodes) used under the store root, each hard-linked inode counted once."""
        seen: set[tuple[int, int]] = set()
        used = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            # Directories are counted when walked into; symlinks to directories are not walked.
            entries = [dirpath] + [os.path.join(dirpath, n) for n in filenames]
            entries += [os.path.join(dirpath, n) for n in dirnames
                        if os.path.islink(os.path.join(dirpath, n))]
            for path in entries:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue  # removed while we walked
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    used += st.st_blocks * 512
        return used, len(seen)

    # ------------------------------------------------------------ internals

    def _find_by_id(self, key: str) -> str | None:
        candidate = key if key.startswith("sha256:") else f"sha256:{key}"
        return candidate if candidate in self._images else None

    def _find_by_reference(self, key: str) -> str | None:
        try:
            ref = Reference.parse(key)
        except InvalidReference:
            return None
        if ref.digest:
            wanted = f"{ref.name}@{ref.digest}"
            for stored in self._images.values():
                if wanted in stored.repo_digests:
                    return stored.id
            for stored in self._images.values():
                names = {Reference.parse(r).name for r in stored.repo_tags + stored.repo_digests}
                if stored.manifest_digest == ref.digest and ref.name in names:
                    return stored.id
            return None
        wanted = str(ref)
        for stored in self._images.values():
            if wanted in stored.repo_tags:
                return stored.id
        return None

    def _find_by_id_prefix(self, key: str) -> str | None:
        prefix = key.removeprefix("sha256:")
        if len(prefix) < _MIN_ID_PREFIX or not _HEX_RE.match(prefix):
            return None
        matches = [i for i in self._images if i.removeprefix("sha256:").startswith(prefix)]
        return matches[0] if len(matches) == 1 else None

    def _untag_everywhere(self, tag: str) -> None:
        for stored in self._images.values():
            if tag in stored.repo_tags:
                stored.repo_tags.remove(tag)
                self._refresh_names(stored)

    def _refresh_names(self, stored: _StoredImage) -> None:
        self._records[stored.id] = dataclasses.replace(
            self._records[stored.id], repo_tags=list(stored.repo_tags),
            repo_digests=list(stored.repo_digests))

    def _build_record(self, stored: _StoredImage) -> ImageRecord:
        manifest_bytes = self.read_blob(stored.manifest_digest, MAX_MANIFEST_SIZE)
        manifest = parse_manifest(manifest_bytes, f"image {stored.id} manifest {stored.manifest_digest}")
        return _record_from(stored, manifest_bytes, self.read_blob(manifest.config.digest, MAX_CONFIG_SIZE))

    def _collect_garbage(self, removed: ImageRecord) -> None:
        """Delete the blobs and unpacked layers of `removed` that no remaining image references."""
        still_used_blobs: set[str] = set()
        still_used_diffs: set[str] = set()
        for record in self._records.values():
            still_used_blobs |= record.blob_digests()
            still_used_diffs |= {layer.diff_id for layer in record.layers}
        for digest in removed.blob_digests() - still_used_blobs:
            self.blob_path(digest).unlink(missing_ok=True)
            self._remove_unpacked_checkpoint(digest)
            self._unsynced_marker(digest).unlink(missing_ok=True)
        for layer in removed.layers:
            if layer.diff_id not in still_used_diffs:
                with self._unpack_locks.setdefault(layer.diff_id, threading.Lock()):
                    shutil.rmtree(self.layer_path(layer), ignore_errors=True)

    def discard_unreferenced_blobs(self, digests: set[str] | list[str]) -> None:
        """Delete the given blobs unless an image uses them (cleanup after a failed import)."""
        with self._exclusive():
            used: set[str] = set()
            for record in self._records.values():
                used |= record.blob_digests()
            for digest in set(digests) - used:
                self.blob_path(digest).unlink(missing_ok=True)
                self._remove_unpacked_checkpoint(digest)
                self._unsynced_marker(digest).unlink(missing_ok=True)

    def _check_layers_present(self, manifest_digest: str, manifest: Manifest) -> None:
        missing = [layer.digest for layer in manifest.layers if not self.has_blob(layer.digest)]
        if missing:
            raise ImageError(f"image {manifest_digest}: layer blobs missing from the store: {missing}")

    # ------------------------------------------------------------ images.json across processes

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This thread alone, and this process alone among those sharing the root, with the
        newest images.json loaded: the frame of every read-modify-write. Re-entrant."""
        with self._lock:
            if self._flock_depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._flock_depth += 1
            try:
                self._refresh(strict=True)
                yield
            finally:
                self._flock_depth -= 1
                if self._flock_depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _refresh(self, strict: bool) -> None:
        """Re-read images.json if another process replaced it since we last read or wrote it.

        strict (before a change, under the flock): a file that cannot be loaded is an error, so
        nothing is written over a state this process does not understand. Otherwise (lookups)
        the last good state stays in use and the failure is logged once per file version.
        """
        for _ in range(_REFRESH_ATTEMPTS):
            sig = _signature_of_path(self._state_path)
            if sig == self._state_sig:
                return
            if self._bad_state and self._bad_state[0] == sig:
                if strict:
                    raise self._bad_state[1]
                return
            try:
                if self._load_state():
                    return
            except ImageError as exc:
                self._bad_state = (sig, exc)
                if strict:
                    raise
                log.error("image store %s: keeping the images known so far: %s", self.root, exc)
                return
        log.warning("image store %s: images.json kept changing while being read", self.root)

    def _load_state(self) -> bool:
        """Load images.json; False (nothing changed here) if it was replaced while being read
        and an image's blobs were gone, which is another process's remove: read it again."""
        try:
            fd = os.open(self._state_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._adopt_state(None, {}, {})
            return True
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read()
            try:
                doc = json.loads(raw)
            except ValueError as exc:
                raise ImageError(f"image store state {self._state_path} is corrupt: {exc}") from exc
            if not isinstance(doc, dict) or doc.get("version") != _STATE_VERSION:
                version = doc.get("version") if isinstance(doc, dict) else None
                raise ImageError(f"image store state {self._state_path} has version "
                                 f"{version!r}, expected {_STATE_VERSION}")
            images: dict[str, _StoredImage] = {}
            records: dict[str, ImageRecord] = {}
            for image_id, entry in (doc.get("images") or {}).items():
                stored = _StoredImage.from_json(image_id, entry)
                try:
                    records[image_id] = self._record_for(stored)
                except ImageError as exc:
                    if _signature_of_path(self._state_path) != _signature_of_fd(fd):
                        os.close(fd)
                        return False
                    # One damaged image must not keep the daemon from starting with the others.
                    log.error("dropping image %s from %s: %s", image_id, self.root, exc)
                    continue
                images[image_id] = stored
        except BaseException:
            os.close(fd)
            raise
        self._adopt_state(fd, images, records)
        return True

    def _record_for(self, stored: _StoredImage) -> ImageRecord:
        """The record of `stored`, reusing the one already built when only its names changed."""
        known = self._images.get(stored.id)
        record = self._records.get(stored.id)
        if (known is not None and record is not None
                and known.manifest_digest == stored.manifest_digest
                and known.index_annotations == stored.index_annotations):
            if known == stored:
                return record
            return dataclasses.replace(record, repo_tags=list(stored.repo_tags),
                                       repo_digests=list(stored.repo_digests))
        return self._build_record(stored)

    def _adopt_state(self, fd: int | None, images: dict[str, _StoredImage],
                     records: dict[str, ImageRecord]) -> None:
        old = self._state_fd
        self._state_fd = fd
        self._state_sig = _signature_of_fd(fd) if fd is not None else None
        self._bad_state = None
        self._images, self._records = images, records
        if old is not None:
            os.close(old)

    def _save_state(self) -> None:
        assert self._flock_depth > 0, "images.json is only written under the store's flock"
        doc = {"version": _STATE_VERSION,
               "images": {i: s.to_json() for i, s in sorted(self._images.items())}}
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".images-", suffix=".json")
        try:
            with os.fdopen(fd, "w", closefd=False) as out:
                json.dump(doc, out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.rename(tmp_name, self._state_path)
        except BaseException:
            os.close(fd)
            Path(tmp_name).unlink(missing_ok=True)
            raise
        # What we wrote is what we know: keep it as the state's reference copy.
        old = self._state_fd
        self._state_fd, self._state_sig, self._bad_state = fd, _signature_of_fd(fd), None
        if old is not None:
            os.close(old)
        _fsync_dir(self.root)


def _link_tree(source: Path, dest: Path) -> None:
    """Hard links in `dest` (created 0700, must be empty) to the regular files under `source`."""
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.listdir(dest):
        raise ImageError(f"directory {dest} for the linked checkpoint files is not empty")
    for dirpath, dirnames, filenames in os.walk(source):
        target_dir = dest / os.path.relpath(dirpath, source)
        for name in dirnames:
            (target_dir / name).mkdir(mode=0o700)
        for name in filenames:
            src, dst = os.path.join(dirpath, name), target_dir / name
            try:
                os.link(src, dst, follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                shutil.copyfile(src, dst, follow_symlinks=False)


def _open_lock_file(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _signature(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _signature_of_fd(fd: int) -> tuple:
    return _signature(os.fstat(fd))


def _signature_of_path(path: Path) -> tuple | None:
    try:
        return _signature(os.stat(path))
    except FileNotFoundError:
        return None


def _publish_dir(tmp: Path, path: Path) -> None:
    """Move a finished directory into place in one rename. If another process sharing the root
    finished the same content first, keep theirs (the caller removes `tmp`)."""
    path.parent.mkdir(exist_ok=True)
    try:
        os.rename(tmp, path)
    except OSError:
        if not path.is_dir():
            raise
