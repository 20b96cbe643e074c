"""The framing of an archive streamed while it is written, and the checkpoint image received from it:
usable only when the trailer matches the bytes, nothing left otherwise, the blob synced afterwards."""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tempfile
from pathlib import Path

import pytest

from criu_glue.archive import ArchiveDigest, write_archive
from criu_glue.archive_frames import MAX_FRAME, FrameReader, FrameWriter, FramingError, read_header
from criu_glue.checkpoint_image import is_checkpoint_image
from criu_glue.checkpoint_pull import receive_streamed_checkpoint_image
from criu_glue.limits import Limits
from criu_glue.test_archive import prepare_members
from oci.store import ImageStore

TAG = "localhost/moved/app:1"


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="archive-frames-test-") as d:
        yield Path(d)


@pytest.fixture
def store(tmp_path):
    s = ImageStore(tmp_path / "store")
    yield s
    s.close()


def framed(tmp_path: Path, archive: Path, written: ArchiveDigest | None, pieces: int = 3,
           tag: str = TAG) -> bytes:
    """What the source sends: the header, `archive` in `pieces` sends (as it grows), the trailer
    (none if `written` is None: the sender gave up)."""
    out = tmp_path / "wire"
    size = archive.stat().st_size
    with open(out, "wb") as sink, open(archive, "rb") as source:
        writer = FrameWriter(sink.fileno())
        writer.header(tag)
        cuts = [size * i // pieces for i in range(pieces + 1)]
        for start, end in zip(cuts, cuts[1:]):
            writer.frames_from_file(source.fileno(), start, end - start)
        if written is not None:
            writer.trailer(written)
        assert writer.sent == size
    return out.read_bytes()


def archive_of(tmp_path: Path) -> tuple[Path, ArchiveDigest]:
    out = tmp_path / "ck.tar"
    return out, write_archive(out, prepare_members(tmp_path))


def nothing_left(store: ImageStore) -> bool:
    unsynced = store.root / "unsynced"
    return (os.listdir(store.root / "tmp") == [] and store.list() == [] and store.unpacked_checkpoints() == []
            and (not unsynced.exists() or os.listdir(unsynced) == []))


# ---- the framing alone ---------------------------------------------------------------------------

def test_frames_give_back_the_archive_and_check_the_trailer(tmp_path):
    archive, written = archive_of(tmp_path)
    wire = io.BytesIO(framed(tmp_path, archive, written, pieces=5))
    assert read_header(wire) == TAG
    reader = FrameReader(wire, 1 << 30)
    data = b"".join(iter(lambda: reader.read(1000), b""))
    assert data == archive.read_bytes() and reader.trailer == written


@pytest.mark.parametrize("cut", ["inside a frame", "before the trailer", "inside the trailer"])
def test_a_cut_stream_is_refused(tmp_path, cut):
    archive, written = archive_of(tmp_path)
    wire = framed(tmp_path, archive, written)
    trailer_len = len(json.dumps(written.to_json())) + 1
    at = {"inside a frame": len(wire) // 2, "before the trailer": len(wire) - trailer_len - 4,
          "inside the trailer": len(wire) - 3}[cut]
    stream = io.BytesIO(wire[:at])
    read_header(stream)
    reader = FrameReader(stream, 1 << 30)
    with pytest.raises(FramingError, match="cut"):
        while reader.read(65536):
            pass
    assert reader.trailer is None


def test_a_trailer_that_does_not_match_the_bytes_is_refused(tmp_path):
    archive, written = archive_of(tmp_path)
    for wrong in (ArchiveDigest("sha256:" + "0" * 64, "sha256:" + "0" * 64, written.size),
                  ArchiveDigest(written.digest, written.diff_id, written.size + 1)):
        stream = io.BytesIO(framed(tmp_path, archive, wrong))
        read_header(stream)
        reader = FrameReader(stream, 1 << 30)
        with pytest.raises(FramingError, match="is not the one the source wrote"):
            while reader.read(65536):
                pass


def test_the_size_budget_and_frame_bound_hold(tmp_path):
    archive, written = archive_of(tmp_path)
    stream = io.BytesIO(framed(tmp_path, archive, written))
    read_header(stream)
    reader = FrameReader(stream, written.size - 1)
    with pytest.raises(FramingError, match="size budget"):
        while reader.read(65536):
            pass
    huge = io.BytesIO(struct.pack(">I", MAX_FRAME + 1) + b"x" * 10)
    with pytest.raises(FramingError, match="frame of"):
        FrameReader(huge, 1 << 40).read()


@pytest.mark.parametrize("header", [b"", b"not json\n", b'{"tag": "a:b"}\n',
                                    b'{"format": "pyshim-archive-frames/1"}\n'])
def test_a_missing_or_bad_header_is_refused(header):
    with pytest.raises(FramingError):
        read_header(io.BytesIO(header))


# ---- a checkpoint image received from the frames --------------------------------------------------

def test_a_streamed_archive_becomes_an_unpacked_checkpoint_image_synced_afterwards(tmp_path, store):
    archive, written = archive_of(tmp_path)
    received = receive_streamed_checkpoint_image(store, io.BytesIO(framed(tmp_path, archive, written)), Limits())
    record, digest = received.record, received.digest
    assert set(received.phases_ms) == {"data", "adopt", "record"}
    assert digest == written.digest and record.repo_tags == [TAG] and is_checkpoint_image(record)
    assert store.blob_path(digest).read_bytes() == archive.read_bytes()
    assert store.unpacked_checkpoints() == [digest] and os.listdir(store.root / "tmp") == []
    # Not synced yet: a crash now would be repaired at the next start; after sync_blob nothing is pending.
    assert os.listdir(store.root / "unsynced") == [digest.replace(":", "-")]
    store.sync_blob(digest)
    assert os.listdir(store.root / "unsynced") == []


@pytest.mark.parametrize("damage", ["cut", "flipped byte", "no trailer"])
def test_a_streamed_archive_that_is_not_what_was_written_leaves_nothing(tmp_path, store, damage):
    archive, written = archive_of(tmp_path)
    wire = bytearray(framed(tmp_path, archive, None if damage == "no trailer" else written))
    if damage == "cut":
        wire = wire[:len(wire) // 2]
    elif damage == "flipped byte":
        wire[len(wire) // 2] ^= 0xFF
    with pytest.raises(FramingError):
        receive_streamed_checkpoint_image(store, io.BytesIO(bytes(wire)), Limits())
    assert nothing_left(store) and not store.has_blob(written.digest)


def test_a_streamed_compressed_archive_is_stored_and_unpacked_later(tmp_path, store):
    out = tmp_path / "ck.tar.zst"
    written = write_archive(out, prepare_members(tmp_path), "zstd")
    record = receive_streamed_checkpoint_image(store, io.BytesIO(framed(tmp_path, out, written)), Limits()).record
    assert record.layers[0].diff_id == written.diff_id != written.digest
    assert store.unpacked_checkpoints() == [] and os.listdir(store.root / "tmp") == []


# ---- a crash before the sync ----------------------------------------------------------------------

def test_an_intact_unsynced_blob_is_synced_at_the_next_start_and_its_entry_dropped(tmp_path, store):
    archive, written = archive_of(tmp_path)
    receive_streamed_checkpoint_image(store, io.BytesIO(framed(tmp_path, archive, written)), Limits())
    store.close()  # the receiver died before its sync
    reopened = ImageStore(tmp_path / "store")
    try:
        assert [r.repo_tags for r in reopened.list()] == [[TAG]] and reopened.has_blob(written.digest)
        assert reopened.unpacked_checkpoints() == [] and os.listdir(reopened.root / "unsynced") == []
    finally:
        reopened.close()


def test_a_damaged_unsynced_blob_goes_with_its_image_at_the_next_start(tmp_path, store):
    archive, written = archive_of(tmp_path)
    receive_streamed_checkpoint_image(store, io.BytesIO(framed(tmp_path, archive, written)), Limits())
    store.close()
    blob = store.blob_path(written.digest)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:  # what a crash leaves of data that never reached the disk
        f.truncate(written.size // 2)
    reopened = ImageStore(tmp_path / "store")
    try:
        assert reopened.list() == [] and not reopened.has_blob(written.digest)
        assert reopened.unpacked_checkpoints() == [] and os.listdir(reopened.root / "unsynced") == []
    finally:
        reopened.close()


def test_an_unsynced_marker_is_left_alone_while_another_process_uses_the_store(tmp_path, store):
    archive, written = archive_of(tmp_path)
    receive_streamed_checkpoint_image(store, io.BytesIO(framed(tmp_path, archive, written)), Limits())
    other = ImageStore(tmp_path / "store")  # e.g. the daemon starting while a receiver still syncs
    try:
        assert other.unpacked_checkpoints() == [written.digest]
        assert os.listdir(other.root / "unsynced") == [written.digest.replace(":", "-")]
    finally:
        other.close()
    assert hashlib.sha256(store.blob_path(written.digest).read_bytes()).hexdigest() == written.digest[7:]


# ---- a receiver killed mid-stream -----------------------------------------------------------------

def test_the_partial_files_of_a_killed_receiver_go_at_the_next_opening(tmp_path, store):
    import subprocess
    import sys
    root = tmp_path / "store"
    # A receiver's store (private tmp) that has begun a blob, then is SIGKILLed: no cleanup of its own.
    script = ("import sys, time; from oci.store import ImageStore; s = ImageStore(sys.argv[1], private_tmp=True); "
              "d = s.scratch_dir('checkpoint-pull-'); (d / 'pages-1.img').write_bytes(b'x' * 4096); "
              "print(d, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        partial = Path(proc.stdout.readline().strip())
        assert partial.is_file() is False and (partial / "pages-1.img").is_file()
        # Alive: another opener (the daemon is one already) leaves its files alone.
        ImageStore(root).close()
        assert (partial / "pages-1.img").is_file()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    reopened = ImageStore(root)  # not the sole user (the fixture's store is open): still removed
    try:
        assert os.listdir(root / "tmp") == []
    finally:
        reopened.close()
