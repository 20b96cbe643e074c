"""The store's cache of unpacked CRIU images: filled once, linked per restore, dropped when stale."""
from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

import pytest

from criu_glue.archive import open_archive, write_archive
from criu_glue.checkpoint_cache import CheckpointCache
from criu_glue.checkpoint_image import build_checkpoint_image
from criu_glue.errors import ArchiveFormatError, ArchiveLimitExceeded
from criu_glue.limits import Limits
from criu_glue.test_archive import IMAGES, prepare_members
from oci.store import ImageStore


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="checkpoint-cache-test-") as d:
        yield Path(d)


@pytest.fixture
def store(tmp_path):
    s = ImageStore(tmp_path / "store")
    yield s
    s.close()


def archive_at(tmp_path: Path, name: str = "ck.tar") -> Path:
    members = prepare_members(tmp_path / f"members-{name}")
    out = tmp_path / name
    write_archive(out, members)
    return out


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def restore_images(cache: CheckpointCache, archive_path: Path, dest: Path, limits: Limits = Limits()):
    with open_archive(archive_path) as archive:
        cached = cache.images_of(archive, limits)
    cache.link(cached, dest)
    return cached


def test_first_restore_unpacks_into_the_store_and_the_next_links_the_same_files(tmp_path, store):
    cache = CheckpointCache(store)
    archive = archive_at(tmp_path)
    first = restore_images(cache, archive, tmp_path / "r1")
    assert first.unpacked and first.digest == sha256_of(archive)
    assert first.image_bytes == sum(len(v) for v in IMAGES.values())
    assert sorted(os.listdir(first.path)) == sorted(IMAGES)
    for name, data in IMAGES.items():
        stored = first.path / name
        assert stat.S_IMODE(stored.stat().st_mode) == 0o444
        linked = tmp_path / "r1" / name
        assert linked.read_bytes() == data and linked.stat().st_ino == stored.stat().st_ino
    second = restore_images(cache, archive, tmp_path / "r2")
    assert not second.unpacked and second.path == first.path
    assert (tmp_path / "r2" / "core-1.img").stat().st_ino == (first.path / "core-1.img").stat().st_ino
    assert list((store.root / "tmp").iterdir()) == []


def test_an_archive_changed_after_caching_is_unpacked_again_and_the_stale_entry_dropped(tmp_path, store):
    cache = CheckpointCache(store)
    archive = archive_at(tmp_path)
    first = restore_images(cache, archive, tmp_path / "r1")
    with open(archive, "ab") as f:  # same content for tar, but another file state and digest
        f.write(b"\0" * 10240)
    again = restore_images(cache, archive, tmp_path / "r2")
    assert again.unpacked and again.digest == sha256_of(archive) != first.digest
    assert store.unpacked_checkpoints() == [again.digest]


def test_an_archive_changing_while_unpacked_is_refused_and_nothing_is_kept(tmp_path, store, monkeypatch):
    cache = CheckpointCache(store)
    archive_path = archive_at(tmp_path)
    with open_archive(archive_path) as archive:
        original = archive.extract_checkpoint_images

        def extract_then_append(dest, limits):
            written = original(dest, limits)
            with open(archive_path, "ab") as f:
                f.write(b"\0" * 512)
            return written

        monkeypatch.setattr(archive, "extract_checkpoint_images", extract_then_append)
        with pytest.raises(ArchiveFormatError, match="changed while"):
            cache.images_of(archive)
    assert store.unpacked_checkpoints() == [] and list((store.root / "tmp").iterdir()) == []


def test_over_budget_unpack_leaves_nothing(tmp_path, store):
    cache = CheckpointCache(store)
    with pytest.raises(ArchiveLimitExceeded):
        restore_images(cache, archive_at(tmp_path), tmp_path / "r1", Limits(max_total_bytes=1000))
    assert store.unpacked_checkpoints() == [] and list((store.root / "tmp").iterdir()) == []


def test_a_checkpoint_image_is_unpacked_at_pull_counted_shared_and_removed_with_it(tmp_path, store):
    cache = CheckpointCache(store)
    archive = archive_at(tmp_path)
    image = build_checkpoint_image(store, archive, "localhost/ck:1")
    before, _ = store.usage()
    cached = cache.unpack_image(image)
    assert cached.unpacked and cached.digest == image.layers[0].digest == sha256_of(archive)
    assert store.usage()[0] >= before + cached.image_bytes
    # A restore naming the image opens the layer blob: it finds the entry made at pull.
    again = restore_images(cache, store.blob_path(image.layers[0].digest), tmp_path / "r1")
    assert not again.unpacked and again.path == cached.path
    # The archive the image was built from has the same digest: its first restore unpacks (its
    # digest is known only once read) but keeps the one entry.
    from_archive = restore_images(cache, archive, tmp_path / "r2")
    assert from_archive.path == cached.path and store.unpacked_checkpoints() == [cached.digest]
    store.remove(image.id)
    assert store.unpacked_checkpoints() == []
    # The restore's private links live on (CRIU may still be reading them).
    assert (tmp_path / "r1" / "core-1.img").read_bytes() == IMAGES["core-1.img"]


def test_least_recently_used_archive_entries_are_dropped(tmp_path, store):
    cache = CheckpointCache(store, max_archive_entries=1)
    one, two = archive_at(tmp_path, "one.tar"), archive_at(tmp_path, "two.tar")
    with open(two, "ab") as f:
        f.write(b"\0" * 10240)  # another digest
    restore_images(cache, one, tmp_path / "r1")
    second = restore_images(cache, two, tmp_path / "r2")
    assert store.unpacked_checkpoints() == [second.digest]
