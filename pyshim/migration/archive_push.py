"""A move's checkpoint image, pushed straight from the archive the source daemon wrote.

The source daemon computes the archive's sha256 and size while it writes it (criu_glue.archive.
write_archive) and reports them in the verbose status (`lastCheckpoint.archive`). The image's manifest
and config are then made from those figures and the archive's small metadata members, and the archive
file itself is uploaded as the layer: its bytes are read once, by the upload, and never copied into an
image store first. The registry checks the upload against the digest, so an archive that changed since
it was written is refused there, not pushed under a wrong name.

A source daemon that reports no digest (an older pyshim) gets the previous path: the image is built in a
throwaway store next to the archive (one more read and write of it) and pushed from there.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from criu_glue.archive import ArchiveDigest
from criu_glue.checkpoint_image import build_checkpoint_image, documents_for_written_archive
from oci.registry import Credentials, RegistryClient
from oci.store import MEDIA_TYPE_OCI_MANIFEST, ImageStore


def push_checkpoint_archive(registry: RegistryClient, archive: Path, written: ArchiveDigest | None, tag: str,
                            credentials: Credentials | None, mark: Callable[[str], None]) -> str:
    """Push `archive` as the checkpoint image `tag`; returns the manifest digest the registry confirmed.
    `mark(phase)` is called after "build_image" and "push"."""
    if written is None:
        return _push_through_store(registry, archive, tag, credentials, mark)
    documents = documents_for_written_archive(archive, written)
    mark("build_image")
    digest = registry.push_blobs(tag, documents.manifest, MEDIA_TYPE_OCI_MANIFEST, documents.blob_sources(),
                                 credentials)
    mark("push")
    return digest


def _push_through_store(registry: RegistryClient, archive: Path, tag: str, credentials: Credentials | None,
                        mark: Callable[[str], None]) -> str:
    store_dir = archive.with_suffix(".store")
    try:
        store = ImageStore(store_dir)
        try:
            image = build_checkpoint_image(store, archive, tag)
            mark("build_image")
            digest = registry.push(store, image, tag, credentials)
            mark("push")
        finally:
            store.close()
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    return digest
