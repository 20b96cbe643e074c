"""A checkpoint image received from a framed stream: CRIU images written once (unpacked), the blob
completed from them after the restore; usable only when the trailer matched, nothing left otherwise,
and a crash before the blob is complete and synced repaired at the store's next start."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from criu_glue.archive import write_archive
from criu_glue.archive_frames import FramingError
from criu_glue.checkpoint_cache import CheckpointCache
from criu_glue.checkpoint_image import is_checkpoint_image
from criu_glue.checkpoint_receive import complete_received_blob, receive_streamed_checkpoint_image
from criu_glue.errors import ArchiveError
from criu_glue.limits import Limits
from criu_glue.test_archive import prepare_members
from criu_glue.test_archive_frames import TAG, archive_of, framed
from oci.store import ImageStore


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="checkpoint-receive-test-") as d:
        yield Path(d)


@pytest.fixture
def store(tmp_path):
    s = ImageStore(tmp_path / "store")
    yield s
    s.close()


def nothing_left(store: ImageStore) -> bool:
    unsynced, blobs = store.root / "unsynced", store.root / "blobs" / "sha256"
    return (os.listdir(store.root / "tmp") == [] and store.list() == [] and store.unpacked_checkpoints() == []
            and (not blobs.exists() or os.listdir(blobs) == [])
            and (not unsynced.exists() or os.listdir(unsynced) == []))


def receive(tmp_path: Path, store: ImageStore, archive: Path, written, **kwargs):
    return receive_streamed_checkpoint_image(store, io.BytesIO(framed(tmp_path, archive, written, **kwargs)),
                                             Limits())


@pytest.mark.parametrize("pieces", [1, 3, 5000])  # as the source daemon's writes came: any frame sizes
def test_the_images_are_written_once_and_the_blob_completed_from_them_afterwards(tmp_path, store, pieces):
    archive, written = archive_of(tmp_path)
    received = receive(tmp_path, store, archive, written, pieces=pieces)
    assert received.digest == written.digest and received.record.repo_tags == [TAG]
    assert is_checkpoint_image(received.record) and set(received.phases_ms) == {"data", "check", "record"}
    assert store.unpacked_checkpoints() == [written.digest] and os.listdir(store.root / "tmp") == []
    blob = store.blob_path(written.digest)
    assert blob.stat().st_size == written.size and blob.read_bytes() != archive.read_bytes()  # holes so far
    assert os.listdir(store.root / "unsynced") == [written.digest.replace(":", "-")]
    complete_received_blob(store, received)
    assert blob.read_bytes() == archive.read_bytes()
    assert os.listdir(store.root / "unsynced") == []


def test_a_restore_can_use_the_image_before_the_blob_is_complete(tmp_path, store):
    from criu_glue.archive import open_archive
    archive, written = archive_of(tmp_path)
    receive(tmp_path, store, archive, written)
    with open_archive(store.blob_path(written.digest)) as opened:
        assert opened.config().id == "c0ffee"
        cached = CheckpointCache(store).images_of(opened)
    assert not cached.unpacked and cached.digest == written.digest  # the entry, not an unpack of the holes
    images = tmp_path / "restore-images"
    CheckpointCache(store).link(cached, images)
    assert (images / "pages-1.img").read_bytes() == (tmp_path / "members" / "checkpoint" / "pages-1.img").read_bytes()


@pytest.mark.parametrize("damage", ["cut", "flipped byte", "no trailer"])
def test_a_stream_that_is_not_what_was_written_leaves_nothing(tmp_path, store, damage):
    archive, written = archive_of(tmp_path)
    wire = bytearray(framed(tmp_path, archive, None if damage == "no trailer" else written))
    if damage == "cut":
        wire = wire[:len(wire) // 2]
    elif damage == "flipped byte":
        wire[len(wire) - 1200] ^= 0xFF  # in the tar's end blocks: nothing but the digest can tell
    with pytest.raises(FramingError):
        receive_streamed_checkpoint_image(store, io.BytesIO(bytes(wire)), Limits())
    assert nothing_left(store)


def test_a_hostile_member_is_refused_and_leaves_nothing(tmp_path, store):
    import tarfile
    hostile = tmp_path / "hostile.tar"
    with tarfile.open(hostile, "w") as tar:
        info = tarfile.TarInfo("checkpoint/escape")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    data = hostile.read_bytes()
    from criu_glue.archive import ArchiveDigest
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with pytest.raises(ArchiveError, match="regular files and directories"):
        receive(tmp_path, store, hostile, ArchiveDigest(digest, digest, len(data)))
    assert nothing_left(store)


def test_the_size_budget_holds(tmp_path, store):
    archive, written = archive_of(tmp_path)
    with pytest.raises(ArchiveError):
        receive_streamed_checkpoint_image(store, io.BytesIO(framed(tmp_path, archive, written)),
                                          Limits(max_total_bytes=1000))
    assert nothing_left(store)


@pytest.mark.parametrize("pieces", [3, 7000])  # 7000: frames of a few bytes, as when the file had just begun
def test_a_compressed_archive_is_stored_whole_and_unpacked_later(tmp_path, store, pieces):
    out = tmp_path / "ck.tar.zst"
    written = write_archive(out, prepare_members(tmp_path), "zstd")
    assert written.size < 7000 * 100
    received = receive(tmp_path, store, out, written, pieces=pieces)
    assert received.record.layers[0].diff_id == written.diff_id != written.digest and received.pending == ()
    assert store.unpacked_checkpoints() == [] and os.listdir(store.root / "tmp") == []
    assert store.blob_path(written.digest).read_bytes() == out.read_bytes()  # stored whole
    # Not synced inside the move's downtime: marked until complete_received_blob syncs it after the restore.
    assert os.listdir(store.root / "unsynced") == [written.digest.replace(":", "-")]
    complete_received_blob(store, received)
    assert os.listdir(store.root / "unsynced") == []


def test_a_compressed_archive_that_is_not_what_was_written_leaves_nothing(tmp_path, store):
    out = tmp_path / "ck.tar.zst"
    written = write_archive(out, prepare_members(tmp_path), "zstd")
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 1
    out.write_bytes(bytes(data))
    with pytest.raises(FramingError, match="not the one the source wrote"):
        receive(tmp_path, store, out, written, pieces=3)
    assert nothing_left(store)


# ---- a crash before the blob is complete and synced -------------------------------------------------

def test_a_blob_left_incomplete_goes_with_its_image_at_the_next_start(tmp_path, store):
    archive, written = archive_of(tmp_path)
    receive(tmp_path, store, archive, written)
    store.close()  # the receiver died before complete_received_blob
    reopened = ImageStore(tmp_path / "store")
    try:
        assert nothing_left(reopened)
    finally:
        reopened.close()


def test_a_complete_but_unsynced_blob_is_kept_at_the_next_start(tmp_path, store):
    archive, written = archive_of(tmp_path)
    received = receive(tmp_path, store, archive, written)
    complete_received_blob(store, received)
    store.mark_unsynced(written.digest)  # as if the host crashed just before its sync
    store.close()
    reopened = ImageStore(tmp_path / "store")
    try:
        assert [r.repo_tags for r in reopened.list()] == [[TAG]]
        assert reopened.blob_path(written.digest).read_bytes() == archive.read_bytes()
        assert reopened.unpacked_checkpoints() == []  # its files may not have reached the disk: unpacked again
        assert os.listdir(reopened.root / "unsynced") == []
    finally:
        reopened.close()


def test_a_marker_is_left_alone_while_another_process_uses_the_store(tmp_path, store):
    archive, written = archive_of(tmp_path)
    received = receive(tmp_path, store, archive, written)
    other = ImageStore(tmp_path / "store")  # e.g. the daemon, while the receiver still completes the blob
    try:
        assert [r.repo_tags for r in other.list()] == [[TAG]] and other.unpacked_checkpoints() == [written.digest]
    finally:
        other.close()
    complete_received_blob(store, received)
    assert store.blob_path(written.digest).read_bytes() == archive.read_bytes()


# ---- a receiver killed mid-stream -----------------------------------------------------------------

def test_the_partial_files_of_a_killed_receiver_go_at_the_next_opening(tmp_path, store):
    root = tmp_path / "store"
    # A receiver's store (private tmp) that has begun an unpack, then is SIGKILLed: no cleanup of its own.
    script = ("import sys, time; from oci.store import ImageStore; s = ImageStore(sys.argv[1], private_tmp=True); "
              "d = s.scratch_dir('checkpoint-receive-'); (d / 'pages-1.img').write_bytes(b'x' * 4096); "
              "print(d, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        partial = Path(proc.stdout.readline().strip())
        assert (partial / "pages-1.img").is_file()
        ImageStore(root).close()  # alive: another opener leaves its files alone
        assert (partial / "pages-1.img").is_file()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    reopened = ImageStore(root)  # not the sole user (the fixture's store is open): removed all the same
    try:
        assert os.listdir(root / "tmp") == []
    finally:
        reopened.close()


# ---- from a pipe or a socket: the CRIU images moved into their files by splice(2) ----------------------

def _fed(wire: bytes, kind: str):
    """An unbuffered stream on a pipe or a socket that a thread fills with `wire` (as the receiver's stdin)."""
    import socket
    import threading
    if kind == "pipe":
        read_end, write_end = os.pipe()
        stream = open(read_end, "rb", buffering=0)
        sink = open(write_end, "wb", buffering=0)
        send, finish = sink.write, sink.close
    else:
        ours, theirs = socket.socketpair()
        stream = ours.makefile("rb", buffering=0)
        ours.close()  # the file object keeps the socket open
        send, finish = theirs.sendall, theirs.close

    def feed():
        try:
            for start in range(0, len(wire), 4096):  # as a network delivers it: in pieces
                send(wire[start:start + 4096])
        except OSError:
            pass  # the receiver stopped reading (it refused the stream)
        finally:
            finish()
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    return stream, feeder


@pytest.mark.parametrize("kind", ["pipe", "socket"])
@pytest.mark.parametrize("pieces", [1, 5000])
def test_from_a_pipe_or_socket_the_images_are_spliced_and_hashed_from_their_files(tmp_path, store, kind, pieces,
                                                                                  monkeypatch):
    import criu_glue.splice_copy as splice_copy
    moved = []
    real_move = splice_copy.Splicer.move
    monkeypatch.setattr(splice_copy.Splicer, "move", lambda self, fd, n: moved.append(real_move(self, fd, n)) or moved[-1])
    archive, written = archive_of(tmp_path)
    stream, feeder = _fed(framed(tmp_path, archive, written, pieces=pieces), kind)
    with stream:
        received = receive_streamed_checkpoint_image(store, stream, Limits())
    feeder.join()
    assert received.digest == written.digest and sum(moved) > 0  # what had not been read ahead went by splice
    unpacked = store.unpacked_checkpoint_path(written.digest)
    for name in ("pages-1.img", "core-1.img", "inventory.img"):
        assert (unpacked / name).read_bytes() == (tmp_path / "members" / "checkpoint" / name).read_bytes()
    complete_received_blob(store, received)
    assert store.blob_path(written.digest).read_bytes() == archive.read_bytes()


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_a_byte_changed_in_a_spliced_image_is_refused_and_leaves_nothing(tmp_path, store, kind):
    archive, written = archive_of(tmp_path)
    wire = bytearray(framed(tmp_path, archive, written, pieces=1))
    data = archive.read_bytes()
    pages = data.index((tmp_path / "members" / "checkpoint" / "pages-1.img").read_bytes()[:4096])
    wire[wire.index(data[:200]) + pages + 150_000] ^= 0x01  # inside pages-1.img's data, which is spliced
    stream, feeder = _fed(bytes(wire), kind)
    with stream, pytest.raises(FramingError, match="not the one the source wrote"):
        receive_streamed_checkpoint_image(store, stream, Limits())
    feeder.join()
    assert nothing_left(store)
