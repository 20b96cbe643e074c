"""OCI image-layout import (directory or tar[.gz] archive) and a small layout writer.

A layout is `oci-layout` + `index.json` + `blobs/<alg>/<hex>`. Archives are read in one
streaming pass: every blob goes straight into the store (verified against its file name),
then index.json decides which images to record; blobs the archive carried but no image
uses are dropped again.
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import json
import logging
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .digest import CHUNK_SIZE, is_digest
from .errors import ImageError, InvalidReference
from .layers import GZIP_MAGIC, ZSTD_MAGIC, clean_member_path, open_decompressed
from .store import (DEFAULT_PLATFORM, INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, MAX_MANIFEST_SIZE,
                    MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
                    Descriptor, ImageRecord, ImageStore, Platform, detect_media_type,
                    normalize_tag, parse_index, parse_manifest, select_platform)

log = logging.getLogger(__name__)

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
# containerd exports put the full image name here and only the tag in ref.name.
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"
LAYOUT_VERSION = "1.0.0"

MEDIA_TYPE_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


# ---------------------------------------------------------------- import

@dataclass
class _LayoutContents:
    """Where a layout came from and its index.json, once its blobs are in the store."""
    source: Path
    index_bytes: bytes


def import_oci_archive(store: ImageStore, path: Path, tag: str | None = None,
                       platform: Platform = DEFAULT_PLATFORM) -> list[ImageRecord]:
    """Import every image named in the layout's index.json; returns the records in index order,
    one per distinct image (entries naming the same manifest under several tags are one image).

    `tag` names the image when the layout holds exactly one (it wins over annotations).
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"OCI archive or layout {path} does not exist")
    new_blobs: set[str] = set()
    try:
        if path.is_dir():
            contents = _copy_directory_blobs(store, path, new_blobs)
        else:
            contents = _stream_archive_blobs(store, path, new_blobs)
        return _record_images(store, contents, tag, platform)
    finally:
        store.discard_unreferenced_blobs(new_blobs)


def _check_layout_marker(raw: bytes | None, source: Path) -> None:
    if raw is None:
        raise ImageError(f"{source}: not an OCI image layout (no oci-layout file)")
    try:
        version = json.loads(raw).get("imageLayoutVersion")
    except (ValueError, AttributeError) as exc:
        raise ImageError(f"{source}: oci-layout is not valid JSON: {exc}") from exc
    if version != LAYOUT_VERSION:
        raise ImageError(f"{source}: unsupported imageLayoutVersion {version!r}")


def _blob_digest_from_name(rel_parts: tuple[str, ...]) -> str | None:
    if len(rel_parts) == 3 and rel_parts[0] == "blobs":
        digest = f"{rel_parts[1]}:{rel_parts[2]}"
        if is_digest(digest):
            return digest
    return None


def _copy_directory_blobs(store: ImageStore, root: Path, new_blobs: set[str]) -> _LayoutContents:
    marker = root / "oci-layout"
    _check_layout_marker(marker.read_bytes() if marker.exists() else None, root)
    index_path = root / "index.json"
    if not index_path.is_file():
        raise ImageError(f"{root}: OCI layout has no index.json")
    blobs_dir = root / "blobs"
    for blob in sorted(blobs_dir.glob("*/*")) if blobs_dir.is_dir() else []:
        digest = _blob_digest_from_name(blob.relative_to(root).parts)
        if digest is None or not blob.is_file():
            continue
        _import_blob(store, digest, blob.stat().st_size, lambda b=blob: open(b, "rb"), new_blobs)
    return _LayoutContents(root, index_path.read_bytes())


def _stream_archive_blobs(store: ImageStore, archive: Path, new_blobs: set[str]) -> _LayoutContents:
    index_bytes = marker = None
    try:
        # "r|*" reads plain or gzip tar as a stream: no seeking back through a compressed file.
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                rel = clean_member_path(member.name, str(archive))
                if not member.isfile():
                    continue
                if rel.parts == ("index.json",):
                    index_bytes = _read_small_member(tar, member, archive)
                elif rel.parts == ("oci-layout",):
                    marker = _read_small_member(tar, member, archive)
                elif (digest := _blob_digest_from_name(rel.parts)) is not None:
                    _import_blob(store, digest, member.size, lambda m=member: tar.extractfile(m),
                                 new_blobs)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ImageError(f"OCI archive {archive} is not a readable tar: {exc}") from exc
    _check_layout_marker(marker, archive)
    if index_bytes is None:
        raise ImageError(f"OCI archive {archive} has no index.json")
    return _LayoutContents(archive, index_bytes)


def _read_small_member(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path) -> bytes:
    if member.size > MAX_MANIFEST_SIZE:
        raise ImageError(f"{archive}: {member.name} is implausibly large ({member.size} bytes)")
    return tar.extractfile(member).read()


def _import_blob(store: ImageStore, digest: str, size: int, open_stream: Callable,
                 new_blobs: set[str]) -> None:
    if store.has_blob(digest):
        return
    with open_stream() as stream:
        store.write_blob(stream, expected_digest=digest, expected_size=size)
    new_blobs.add(digest)


def _record_images(store: ImageStore, contents: _LayoutContents, tag: str | None,
                   platform: Platform) -> list[ImageRecord]:
    context = f"{contents.source} index.json"
    index = parse_index(contents.index_bytes, context)
    images = _entries_by_image(index.manifests)
    if tag is not None and len(images) != 1:
        raise ImageError(f"{contents.source}: a tag was given but the layout holds "
                         f"{len(images)} images; cannot tell which one it names")
    records = []
    for entries in images.values():
        if tag:
            tags = [normalize_tag(tag)]
        else:
            tags = [t for entry in entries for t in _tags_from_annotations(entry, contents.source)]
        # Annotations of the first entry: the others differ only in the name they give it.
        records.append(_record_image(store, entries[0], list(dict.fromkeys(tags)), index.annotations,
                                     platform, f"{contents.source} image {entries[0].digest}"))
    return records


def _entries_by_image(manifests: list[Descriptor]) -> dict[str, list[Descriptor]]:
    """index.json entries grouped by the manifest they point to, in index order.

    skopeo and Podman write a multi-tag archive as one entry per tag, all with the same digest:
    that is one image with several names, not several images."""
    grouped: dict[str, list[Descriptor]] = {}
    for descriptor in manifests:
        grouped.setdefault(descriptor.digest, []).append(descriptor)
    return grouped


def _tags_from_annotations(descriptor: Descriptor, source: Path) -> list[str]:
    name = descriptor.annotations.get(CONTAINERD_NAME_ANNOTATION) or \
        descriptor.annotations.get(REF_NAME_ANNOTATION)
    # A bare ref.name ("latest") is a tag without a repository: nothing to name the image by.
    if not name or not any(c in name for c in "/:"):
        if name:
            log.warning("%s: ref.name %r has no repository; importing %s untagged",
                        source, name, descriptor.digest)
        return []
    try:
        return [normalize_tag(name)]
    except InvalidReference as exc:
        raise ImageError(f"{source}: image {descriptor.digest} has an unusable name: {exc}") from exc


def _record_image(store: ImageStore, descriptor: Descriptor, tags: list[str],
                  index_annotations: dict[str, str], platform: Platform, context: str) -> ImageRecord:
    raw = store.read_blob(descriptor.digest, MAX_MANIFEST_SIZE)
    annotations = {**index_annotations, **descriptor.annotations}
    media_type = detect_media_type(raw, descriptor.media_type, context)
    if media_type in INDEX_MEDIA_TYPES:
        nested = parse_index(raw, context)
        chosen = select_platform(nested, platform, context)
        annotations = {**annotations, **nested.annotations, **chosen.annotations}
        raw = store.read_blob(chosen.digest, MAX_MANIFEST_SIZE)
    elif media_type not in MANIFEST_MEDIA_TYPES:
        raise ImageError(f"{context}: media type {media_type!r} is neither an image manifest nor an index")
    manifest = parse_manifest(raw, context)
    config_bytes = store.read_blob(manifest.config.digest)
    return store.add_image(raw, config_bytes, tags, (), annotations)


# ---------------------------------------------------------------- writing layouts

def write_oci_layout(dest_dir: Path, layers: list[Path], config: dict, ref_name: str,
                     annotations: dict[str, str] | None = None) -> str:
    """Write (or add to) an OCI layout holding one image; returns its manifest digest.

    `layers` are tar files bottom -> top, plain, gzip or zstd; their diff_ids are computed and
    written into the config's rootfs, so `config` only needs the runtime settings.
    An existing index.json entry with the same ref_name is replaced.
    """
    dest_dir = Path(dest_dir)
    (dest_dir / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (dest_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": LAYOUT_VERSION}))

    layer_descriptors, diff_ids = [], []
    for layer in layers:
        digest, size = _copy_file_blob(dest_dir, Path(layer))
        layer_descriptors.append({"mediaType": _layer_media_type(Path(layer)), "digest": digest,
                                  "size": size})
        diff_ids.append(_diff_id(Path(layer)))

    config = copy.deepcopy(config)
    config.setdefault("architecture", DEFAULT_PLATFORM.architecture)
    config.setdefault("os", DEFAULT_PLATFORM.os)
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config_desc = _write_json_blob(dest_dir, config, MEDIA_TYPE_OCI_CONFIG)

    manifest = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                "config": config_desc, "layers": layer_descriptors}
    if annotations:
        manifest["annotations"] = dict(annotations)
    manifest_desc = _write_json_blob(dest_dir, manifest, MEDIA_TYPE_OCI_MANIFEST)
    manifest_desc["annotations"] = {REF_NAME_ANNOTATION: ref_name}
    manifest_desc["platform"] = {"architecture": config["architecture"], "os": config["os"]}
    _add_to_index(dest_dir, manifest_desc, ref_name)
    return manifest_desc["digest"]


def archive_layout(layout_dir: Path, archive: Path, compress: bool = False) -> Path:
    """Pack a layout directory into a tar (gzip when `compress`) with layout-relative names."""
    mode = "w:gz" if compress else "w"
    with tarfile.open(archive, mode) as tar:
        for name in sorted(os.listdir(layout_dir)):
            tar.add(Path(layout_dir) / name, arcname=name)
    return Path(archive)


def _add_to_index(dest_dir: Path, manifest_desc: dict, ref_name: str) -> None:
    index_path = dest_dir / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_bytes())
    else:
        index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": []}
    index["manifests"] = [m for m in index["manifests"]
                          if (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) != ref_name]
    index["manifests"].append(manifest_desc)
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.rename(tmp, index_path)


def _write_json_blob(dest_dir: Path, doc: dict, media_type: str) -> dict:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (dest_dir / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _copy_file_blob(dest_dir: Path, src: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    tmp = dest_dir / "blobs" / "sha256" / f".tmp-{os.getpid()}"
    size = 0
    with open(src, "rb") as inp, open(tmp, "wb") as out:
        while chunk := inp.read(CHUNK_SIZE):
            hasher.update(chunk)
            out.write(chunk)
            size += len(chunk)
    os.rename(tmp, tmp.with_name(hasher.hexdigest()))
    return "sha256:" + hasher.hexdigest(), size


def _layer_media_type(path: Path) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(GZIP_MAGIC):
        return MEDIA_TYPE_LAYER_GZIP
    if magic == ZSTD_MAGIC:
        return MEDIA_TYPE_LAYER_ZSTD
    return MEDIA_TYPE_LAYER_TAR


def _diff_id(path: Path) -> str:
    hasher = hashlib.sha256()
    with open_decompressed(path) as stream:
        while chunk := stream.read(CHUNK_SIZE):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()
