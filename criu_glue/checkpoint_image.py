"""Checkpoint images: a checkpoint archive packaged as an OCI image, and telling one apart.

In Kubernetes a checkpoint comes back as an image. A *checkpoint image* has exactly one layer,
whose root is the archive's content (checkpoint/, config.dump, spec.dump, ...), no base layers
(the base image is named in config.dump), and an annotation that marks it. Each engine looks
for its own key, so images built here carry all three:

    io.kubernetes.cri-o.annotations.checkpoint.name   CRI-O
    org.criu.checkpoint.container.name                 checkpointctl, containerd
    io.podman.annotations.checkpoint.name              Podman

plus checkpointctl's descriptive extras (engine, pod, namespace, base image, runtime).

The layer is the archive file itself, byte for byte (a tar, plain or gzip or zstd, is already
a layer of exactly these members), or the same tar recompressed on request; either way it is
streamed into the store with its digest and diff_id computed on the way, never held in memory.
Restore opens the layer blob with criu_glue.archive.open_archive, like any archive.

The archive is untrusted: it is validated with open_archive before anything is written, and
nothing from it names or moves an image tag (the advisory that ended containerd's restore path
was about tags poisoned from archive data): the tag comes from the caller only. Annotation
values taken from the archive are descriptive strings; restore must not act on them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from oci.digest import CHUNK_SIZE
from oci.errors import ImageError
from oci.layout import MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_TAR, MEDIA_TYPE_LAYER_ZSTD
from oci.store import (MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST, ImageRecord, ImageStore,
                       normalize_tag)

from .archive import GZIP_LEVEL, ZSTD_LEVEL, ArchiveDigest, open_archive
from .archive_format import format_rfc3339_ns
from .errors import ArchiveError
from .inspect import summary_of
from .limits import Limits
from .tarstream import COMPRESSIONS, decompressed

# ---------------------------------------------------------------- annotation keys

ANNOTATION_CRIO_NAME = "io.kubernetes.cri-o.annotations.checkpoint.name"
ANNOTATION_CHECKPOINTCTL_NAME = "org.criu.checkpoint.container.name"
ANNOTATION_PODMAN_NAME = "io.podman.annotations.checkpoint.name"
# Any one of these marks a checkpoint image; the value is the checkpointed container's name.
CHECKPOINT_ANNOTATIONS = (ANNOTATION_CRIO_NAME, ANNOTATION_CHECKPOINTCTL_NAME,
                          ANNOTATION_PODMAN_NAME)

# checkpointctl's extras (lib/metadata annotations.go), descriptive only.
ANNOTATION_ENGINE = "org.criu.checkpoint.engine.name"
ANNOTATION_POD_NAME = "org.criu.checkpoint.pod.name"
ANNOTATION_POD_NAMESPACE = "org.criu.checkpoint.pod.namespace"
ANNOTATION_ROOTFS_IMAGE_NAME = "org.criu.checkpoint.rootfsImageName"
ANNOTATION_ROOTFS_IMAGE_ID = "org.criu.checkpoint.rootfsImageID"
ANNOTATION_ROOTFS_IMAGE_USER_REQUESTED = "org.criu.checkpoint.rootfsImageUserRequested"
ANNOTATION_RUNTIME_NAME = "org.criu.checkpoint.runtime.name"
CHECKPOINTCTL_EXTRAS = (ANNOTATION_ENGINE, ANNOTATION_POD_NAME, ANNOTATION_POD_NAMESPACE,
                        ANNOTATION_ROOTFS_IMAGE_NAME, ANNOTATION_ROOTFS_IMAGE_ID,
                        ANNOTATION_ROOTFS_IMAGE_USER_REQUESTED, ANNOTATION_RUNTIME_NAME)

# How build_checkpoint_image stores the layer: "keep" the archive's own bytes, or recompress.
LAYER_COMPRESSIONS = ("keep", *COMPRESSIONS)
_LAYER_MEDIA_TYPES = {"none": MEDIA_TYPE_LAYER_TAR, "gzip": MEDIA_TYPE_LAYER_GZIP,
                      "zstd": MEDIA_TYPE_LAYER_ZSTD}
CREATED_BY = "pyshim checkpoint-image build"

# Go's GOARCH names, which image configs use, for the machine names Python reports.
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
           "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386",
           "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


class CheckpointImageError(ArchiveError):
    """A checkpoint image could not be built (bad tag, archive changed while read, ...)."""


# ---------------------------------------------------------------- detection

def checkpoint_name_of(image: ImageRecord,
                       config_annotations: dict[str, str] | None = None) -> str | None:
    """The checkpointed container's name if `image` is a checkpoint image, else None.

    Looks for any of CHECKPOINT_ANNOTATIONS in the image's index and manifest annotations
    (ImageRecord.annotations), then in `config_annotations` (the config's own annotations, for
    callers that have them), then in the config's Labels, where builders that cannot set
    manifest annotations (and `docker save`/`load`, which drops them) leave them. The presence
    of a key is what counts, as in CRI-O: the name may be "" — test the result with `is None`,
    or use is_checkpoint_image().
    """
    for source in (image.annotations, config_annotations or {}, image.config.labels):
        for key in CHECKPOINT_ANNOTATIONS:
            value = source.get(key)
            if isinstance(value, str):
                return value
    return None


def is_checkpoint_image(image: ImageRecord,
                        config_annotations: dict[str, str] | None = None) -> bool:
    return checkpoint_name_of(image, config_annotations) is not None


# ---------------------------------------------------------------- building

def build_checkpoint_image(store: ImageStore, archive_path: str | os.PathLike, tag: str,
                           limits: Limits = Limits(), compression: str = "keep") -> ImageRecord:
    """Turn the checkpoint archive at `archive_path` into a checkpoint image tagged `tag`.

    The archive must pass open_archive (config.dump, spec.dump and checkpoint/ with CRIU images,
    safe member names, within `limits`); ArchiveError subclasses say what is wrong, and nothing
    is added to the store then. `tag` (NAME[:TAG]) is the only name the image gets; it moves to
    the new image if another one had it. `compression` "keep" stores the archive's bytes as the
    layer (plain tar, gzip or zstd alike); "none", "gzip" or "zstd" recompress it.
    """
    if compression not in LAYER_COMPRESSIONS:
        raise ValueError(f"unknown layer compression {compression!r}; expected one of "
                         f"{LAYER_COMPRESSIONS}")
    try:
        normalized_tag = normalize_tag(tag)
    except ImageError as exc:
        raise CheckpointImageError(f"cannot tag a checkpoint image {tag!r}: {exc}") from None
    archive_path = Path(archive_path)
    source = open(archive_path, "rb")
    with source:
        before = os.fstat(source.fileno())
        with open_archive(archive_path, limits) as archive:
            if _identity(os.stat(archive_path)) != _identity(before):
                raise CheckpointImageError(f"checkpoint archive {archive_path} was replaced while "
                                           "it was being read")
            summary = summary_of(archive)
            config = archive.config()
            source_compression = archive.compression
        layer_compression = source_compression if compression == "keep" else compression
        layer_digest, diff_id, layer_size = _store_layer(store, source, source_compression,
                                                         layer_compression)
        try:
            if _identity(os.fstat(source.fileno()), content=True) != _identity(before, content=True):
                raise CheckpointImageError(f"checkpoint archive {archive_path} changed while it "
                                           "was being read; build again from a finished archive")
            documents = _image_documents(summary, config, _LAYER_MEDIA_TYPES[layer_compression],
                                         layer_digest, diff_id, layer_size)
            return store.add_image(documents.manifest, documents.config, [normalized_tag])
        except BaseException:
            store.discard_unreferenced_blobs({layer_digest})
            raise


@dataclass(frozen=True)
class CheckpointImageDocuments:
    """A checkpoint image whose one layer is an archive file as it is: what a push needs besides the file."""
    manifest: bytes
    config: bytes
    archive_path: Path
    layer_digest: str
    layer_size: int

    def blob_sources(self) -> dict[str, Callable[[], BinaryIO]]:
        """digest -> opener of its content, for oci.registry.RegistryClient.push_blobs."""
        path = self.archive_path
        return {self.layer_digest: lambda: open(path, "rb"),
                _sha256(self.config): lambda: io.BytesIO(self.config)}


def documents_for_written_archive(archive_path: str | os.PathLike, written: ArchiveDigest,
                                  limits: Limits = Limits()) -> CheckpointImageDocuments:
    """The manifest and config of the checkpoint image whose layer is the archive at `archive_path`
    byte for byte ("keep"), from the digest computed while it was written (write_archive's result):
    its data is not read again, only its tar headers and small metadata members (seeks, for a plain tar).

    The archive is validated with open_archive as for build_checkpoint_image. A file that is not the
    size it was written with is refused; one changed in place would be refused by the registry,
    which checks every uploaded blob against its digest."""
    archive_path = Path(archive_path)
    with open_archive(archive_path, limits) as archive:
        if archive.file_stat().st_size != written.size:
            raise CheckpointImageError(f"checkpoint archive {archive_path} is {archive.file_stat().st_size} "
                                       f"bytes, but {written.size} were written; it changed since")
        summary, config, compression = summary_of(archive), archive.config(), archive.compression
    if compression == "none" and written.diff_id != written.digest:
        raise CheckpointImageError(f"checkpoint archive {archive_path} is a plain tar, whose diff_id is its digest, "
                                   f"not {written.diff_id}")
    documents = _image_documents(summary, config, _LAYER_MEDIA_TYPES[compression], written.digest,
                                 written.diff_id, written.size)
    return CheckpointImageDocuments(documents.manifest, documents.config, archive_path, written.digest,
                                    written.size)


@dataclass(frozen=True)
class _Documents:
    manifest: bytes
    config: bytes


def _image_documents(summary, config, layer_media_type: str, layer_digest: str, diff_id: str,
                     layer_size: int) -> _Documents:
    """Manifest and config of a one-layer checkpoint image, annotated as every engine recognises one."""
    container_name = config.name or summary.container_name or config.id
    annotations = {key: container_name for key in CHECKPOINT_ANNOTATIONS}
    extras = {ANNOTATION_ENGINE: summary.engine,
              ANNOTATION_POD_NAME: summary.pod_name,
              ANNOTATION_POD_NAMESPACE: summary.namespace,
              ANNOTATION_ROOTFS_IMAGE_NAME: config.rootfs_image_name,
              # checkpointctl takes rootfsImageRef; Podman records only its rootfsImageID.
              ANNOTATION_ROOTFS_IMAGE_ID: config.rootfs_image_ref or config.image_id,
              ANNOTATION_ROOTFS_IMAGE_USER_REQUESTED: config.rootfs_image,
              ANNOTATION_RUNTIME_NAME: config.runtime}
    annotations.update({k: v for k, v in extras.items() if v})
    created = format_rfc3339_ns(config.checkpointed_time_ns or time.time_ns())
    config_bytes = _canonical_json({
        "created": created,
        "architecture": host_architecture(),
        "os": "linux",
        # Labels too: tools that drop manifest annotations keep these.
        "config": {"Labels": annotations},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": CREATED_BY,
                     "comment": f"checkpoint of container {container_name}"}],
    })
    manifest_bytes = _canonical_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_OCI_CONFIG, "digest": _sha256(config_bytes),
                   "size": len(config_bytes)},
        "layers": [{"mediaType": layer_media_type, "digest": layer_digest, "size": layer_size}],
        "annotations": annotations,
    })
    return _Documents(manifest_bytes, config_bytes)


def host_architecture() -> str:
    machine = platform.machine()
    return _GOARCH.get(machine, machine.lower())


def _identity(st: os.stat_result, content: bool = False) -> tuple:
    """Which file this is; with `content`, also whether it was written to since (ctime cannot
    be set back by anyone, unlike mtime)."""
    ident = (st.st_dev, st.st_ino)
    return ident + (st.st_size, st.st_mtime_ns, st.st_ctime_ns) if content else ident


def _canonical_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- the layer, streamed

def _store_layer(store: ImageStore, source: BinaryIO, source_compression: str,
                 layer_compression: str) -> tuple[str, str, int]:
    """Write the layer blob from `source`; returns (digest, diff_id, size).

    One pass over the archive: the store hashes the blob as it writes it (digest), and the
    uncompressed tar stream is hashed alongside (diff_id), in bounded chunks.
    """
    if layer_compression == source_compression == "none":
        # A plain tar layer is its own uncompressed stream: its diff_id is its sha256 digest, which the
        # store computes while writing it. Hashing it a second time cost 0.7 s per GiB.
        reader = _ChunkReader(_copy(source, _HashSink(None)))
        digest = store.write_blob(reader)
        if not digest.startswith("sha256:"):
            raise CheckpointImageError(f"the store hashed the layer as {digest}, not sha256")
        return digest, digest, reader.size
    diff = hashlib.sha256()
    if layer_compression == source_compression:
        chunks = _copy(source, _uncompressed_sink(source_compression, diff))
    else:
        chunks = _recompress(source, source_compression, layer_compression, diff)
    reader = _ChunkReader(chunks)
    digest = store.write_blob(reader)
    return digest, "sha256:" + diff.hexdigest(), reader.size


def _copy(source: BinaryIO, sink) -> Iterator[bytes]:
    source.seek(0)
    while chunk := source.read(CHUNK_SIZE):
        sink.write(chunk)
        yield chunk
    sink.close()


def _recompress(source: BinaryIO, source_compression: str, layer_compression: str,
                diff) -> Iterator[bytes]:
    if layer_compression == "gzip":
        # wbits 31: a gzip member with mtime 0, so the same archive gives the same layer.
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    elif layer_compression == "zstd":
        import zstandard
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compressobj()
    else:
        compressor = None
    with decompressed(source, source_compression) as tar_stream:
        while chunk := tar_stream.read(CHUNK_SIZE):
            diff.update(chunk)
            yield compressor.compress(chunk) if compressor else chunk
    if compressor:
        yield compressor.flush()


class _ChunkReader:
    """A read()-able stream over an iterator of byte chunks (what ImageStore.write_blob takes)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        for chunk in self._chunks:
            if chunk:
                self.size += len(chunk)
                return chunk
        return b""


class _HashSink:
    def __init__(self, hasher):
        self._hasher = hasher  # None: count nothing, hash nothing

    def write(self, data: bytes) -> int:
        if self._hasher is not None:
            self._hasher.update(data)
        return len(data)

    def close(self) -> None:
        pass


class _GunzipSink:
    """Hashes the decompressed content of the gzip bytes written to it, in bounded pieces
    (a chunk of a gzip bomb expands a thousandfold), member after member."""

    def __init__(self, hasher):
        self._hasher = hasher
        self._inflate: Any = zlib.decompressobj(31)

    def write(self, data: bytes) -> int:
        pending = data
        while pending:
            if self._inflate is None:
                # Between members: zero padding is allowed there, as Python's gzip allows it.
                pending = pending.lstrip(b"\0")
                if not pending:
                    break
                self._inflate = zlib.decompressobj(31)
            self._hasher.update(self._inflate.decompress(pending, CHUNK_SIZE))
            pending = self._inflate.unconsumed_tail
            if self._inflate.eof:
                pending = self._inflate.unused_data + pending
                self._inflate = None
        return len(data)

    def close(self) -> None:
        if self._inflate is not None:
            self._hasher.update(self._inflate.flush())


class _ZstdSink:
    def __init__(self, hasher):
        import zstandard
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            _HashSink(hasher), write_size=CHUNK_SIZE, closefd=False)

    def write(self, data: bytes) -> int:
        self._writer.write(data)
        return len(data)

    def close(self) -> None:
        self._writer.flush()


def _uncompressed_sink(compression: str, hasher):
    if compression == "gzip":
        return _GunzipSink(hasher)
    if compression == "zstd":
        return _ZstdSink(hasher)
    return _HashSink(hasher)
