"""Checkpoint layers unpacked while they download: used only when proven to be the stored blob's content."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
import tempfile
from pathlib import Path

import pytest

import criu_glue.archive as archive_mod
from criu_glue.archive import write_archive
from criu_glue.checkpoint_cache import CheckpointCache
from criu_glue.checkpoint_image import ANNOTATION_CRIO_NAME, is_checkpoint_image
from criu_glue.checkpoint_pull import CheckpointUnpackTap, receive_checkpoint_image, unpack_while_pulling
from criu_glue.limits import Limits
from criu_glue.test_archive import IMAGES, base_entries, prepare_members, tar_of
from oci.errors import DigestMismatch
from oci.layout import MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_TAR
from oci.registry import TeeReader
from oci.store import Descriptor, ImageStore

CHECKPOINT = {ANNOTATION_CRIO_NAME: "app"}


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="checkpoint-pull-test-") as d:
        yield Path(d)


@pytest.fixture
def store(tmp_path):
    s = ImageStore(tmp_path / "store")
    yield s
    s.close()


def layer(data: bytes, media_type: str = MEDIA_TYPE_LAYER_TAR) -> Descriptor:
    return Descriptor(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def download(store: ImageStore, data: bytes, descriptor: Descriptor, limits: Limits = Limits(),
             stream=None) -> CheckpointUnpackTap:
    """What RegistryClient.fetch_blob does with a tap: write the blob through it, then complete or abort."""
    tap = unpack_while_pulling(store, limits)(CHECKPOINT, [descriptor], descriptor)
    assert tap is not None
    try:
        store.write_blob(TeeReader(stream or io.BytesIO(data), tap), descriptor.digest, descriptor.size)
    except BaseException:
        tap.abort()
        raise
    tap.complete()
    return tap


def nothing_left(store: ImageStore) -> bool:
    return store.unpacked_checkpoints() == [] and os.listdir(store.root / "tmp") == []


def archive_bytes(tmp_path: Path) -> bytes:
    out = tmp_path / "ck.tar"
    write_archive(out, prepare_members(tmp_path))
    return out.read_bytes()


def test_the_layer_lands_unpacked_and_a_restore_only_links_it(tmp_path, store):
    data = archive_bytes(tmp_path)
    descriptor = layer(data)
    download(store, data, descriptor)
    assert store.unpacked_checkpoints() == [descriptor.digest]
    entry = store.unpacked_checkpoint_path(descriptor.digest)
    for name, content in IMAGES.items():
        assert (entry / name).read_bytes() == content
        assert os.stat(entry / name).st_mode & 0o777 == 0o444
    assert os.listdir(store.root / "tmp") == []
    # The cache finds the entry: nothing is unpacked again at restore.
    with archive_mod.open_archive(store.blob_path(descriptor.digest)) as archive:
        cached = CheckpointCache(store).images_of(archive)
    assert not cached.unpacked and cached.path == entry


def test_only_plain_single_layer_checkpoint_images_are_tapped(tmp_path, store):
    data = archive_bytes(tmp_path)
    factory = unpack_while_pulling(store, Limits())
    plain, gzipped = layer(data), layer(data, MEDIA_TYPE_LAYER_GZIP)
    assert factory({}, [plain], plain) is None  # an ordinary image
    assert factory(CHECKPOINT, [gzipped], gzipped) is None
    other = layer(b"x")
    assert factory(CHECKPOINT, [plain, other], plain) is None
    assert nothing_left(store)


def test_content_that_does_not_match_its_digest_leaves_nothing(tmp_path, store):
    data = archive_bytes(tmp_path)
    descriptor = layer(data)
    tampered = bytearray(data)
    tampered[len(data) // 2] ^= 1
    with pytest.raises(DigestMismatch):
        download(store, bytes(tampered), descriptor)
    assert nothing_left(store) and not store.has_blob(descriptor.digest)


def test_an_interrupted_download_leaves_nothing(tmp_path, store):
    data = archive_bytes(tmp_path)

    class Broken(io.BytesIO):
        def read(self, *size):
            if self.tell() > len(data) // 2:
                raise ConnectionResetError("peer went away")
            return super().read(*size)

    with pytest.raises(ConnectionResetError):
        download(store, data, layer(data), stream=Broken(data))
    assert nothing_left(store)


def test_a_hostile_layer_is_stored_but_its_images_are_not_used(tmp_path, store):
    link = tarfile.TarInfo("checkpoint/pages-2.img")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    data = tar_of([*base_entries(), ("checkpoint/pages-2.img", link)])
    download(store, data, layer(data))
    assert store.has_blob(layer(data).digest)  # the pull goes on; restore refuses it from the blob
    assert nothing_left(store)


def test_the_size_budget_and_a_full_disk_mid_unpack_leave_nothing(tmp_path, store, monkeypatch):
    data = archive_bytes(tmp_path)
    download(store, data, layer(data), limits=Limits(max_total_bytes=1000))
    assert nothing_left(store)
    store.blob_path(layer(data).digest).unlink()  # downloaded again below, through the full disk

    real_copy = archive_mod.copy_member_data

    def disk_full(reader, fd, size, what):
        if size > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(reader, fd, size, what)

    monkeypatch.setattr(archive_mod, "copy_member_data", disk_full)
    tap = download(store, data, layer(data))
    assert isinstance(tap._error, OSError) and tap._error.errno == errno.ENOSPC
    assert nothing_left(store)


def test_a_received_archive_becomes_an_unpacked_checkpoint_image(tmp_path, store):
    out = tmp_path / "ck.tar"
    written = write_archive(out, prepare_members(tmp_path))
    record = receive_checkpoint_image(store, io.BytesIO(out.read_bytes()), "localhost/moved/app:1", written, Limits())
    assert record.repo_tags == ["localhost/moved/app:1"] and record.layers[0].digest == written.digest
    assert is_checkpoint_image(record)
    assert store.unpacked_checkpoints() == [written.digest] and os.listdir(store.root / "tmp") == []


def test_a_received_stream_that_is_not_what_was_written_leaves_nothing(tmp_path, store):
    out = tmp_path / "ck.tar"
    written = write_archive(out, prepare_members(tmp_path))
    data = bytearray(out.read_bytes())
    data[len(data) // 3] ^= 0xFF
    with pytest.raises(DigestMismatch):
        receive_checkpoint_image(store, io.BytesIO(bytes(data)), "localhost/moved/app:1", written, Limits())
    short = io.BytesIO(out.read_bytes()[:-4096])
    with pytest.raises(DigestMismatch):
        receive_checkpoint_image(store, short, "localhost/moved/app:1", written, Limits())
    assert nothing_left(store) and store.list() == [] and not store.has_blob(written.digest)


def test_a_received_compressed_archive_is_stored_and_unpacked_later(tmp_path, store):
    out = tmp_path / "ck.tar.zst"
    written = write_archive(out, prepare_members(tmp_path), "zstd")
    record = receive_checkpoint_image(store, io.BytesIO(out.read_bytes()), "localhost/moved/app:2", written, Limits())
    assert record.layers[0].diff_id == written.diff_id != written.digest
    assert store.unpacked_checkpoints() == [] and os.listdir(store.root / "tmp") == []
    with archive_mod.open_archive(store.blob_path(written.digest)) as archive:
        assert CheckpointCache(store).images_of(archive).unpacked
