"""`migrate --direct`'s Receiver against the real `pyshim checkpoint-image receive` on a local store: the
archive is sent while it grows under the daemon's temporary name, and a cancelled or cut stream keeps nothing."""
from __future__ import annotations

import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from criu_glue.archive import write_archive
from criu_glue.test_archive import prepare_members
from oci.store import ImageStore
from pyshim.checkpoint_restore.checkpoint import archive_temp_path
from pyshim.migration import direct
from pyshim.migration.workload import MoveError

TAG = "localhost/pyshim-migrate/app:1"


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="direct-stream-test-") as d:
        yield Path(d)


def receive_command(root: Path) -> str:
    return " ".join(shlex.quote(a) for a in (sys.executable, "-m", "pyshim", "checkpoint-image", "receive",
                                             "--root", str(root)))


def write_slowly(source: Path, location: Path, pieces: int = 8) -> None:
    """What the source daemon does: the archive grows under its temporary name, then is renamed."""
    data = source.read_bytes()
    tmp = archive_temp_path(location, "abc123")
    with open(tmp, "wb") as f:
        for i in range(pieces):
            f.write(data[len(data) * i // pieces:len(data) * (i + 1) // pieces])
            f.flush()
            time.sleep(0.02)
    os.rename(tmp, location)


def store_state(root: Path) -> tuple[list, list, list]:
    store = ImageStore(root / "images")
    try:
        return ([r.repo_tags for r in store.list()], store.unpacked_checkpoints(),
                sorted(os.listdir(root / "images" / "tmp")))
    finally:
        store.close()


def test_the_archive_is_sent_while_it_is_written_and_stored_on_the_target(tmp_path):
    source = tmp_path / "built.tar"
    written = write_archive(source, prepare_members(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    location = work / "c1.tar"
    root = tmp_path / "target"
    receiver = direct.Receiver(receive_command(root), timeout=60, tag=TAG)
    receiver.wait_ready()
    receiver.follow(location)
    writer = threading.Thread(target=write_slowly, args=(source, location))
    writer.start()
    writer.join()  # CheckpointContainer returned
    receiver.finish(location, written)
    assert set(receiver.phases_ms) == {"data", "check", "record"} and receiver.tail_bytes <= written.size
    receiver.wait_durable()
    tags, unpacked, tmp = store_state(root)
    assert tags == [[TAG]] and unpacked == [written.digest] and tmp == []
    assert os.listdir(root / "images" / "unsynced") == []
    assert (root / "images" / "blobs" / "sha256" / written.digest[7:]).read_bytes() == source.read_bytes()


def test_a_cancelled_stream_keeps_nothing_on_the_target(tmp_path):
    source = tmp_path / "built.tar"
    write_archive(source, prepare_members(tmp_path))
    location = tmp_path / "c1.tar"
    root = tmp_path / "target"
    receiver = direct.Receiver(receive_command(root), timeout=60, tag=TAG)
    receiver.follow(location)
    tmp = archive_temp_path(location, "abc123")
    tmp.write_bytes(source.read_bytes()[:5000])  # the daemon began the archive, then the checkpoint failed
    time.sleep(0.2)
    tmp.unlink()
    receiver.cancel()
    assert store_state(root) == ([], [], [])


def test_a_trailer_that_does_not_match_what_was_sent_is_refused(tmp_path):
    source = tmp_path / "built.tar"
    written = write_archive(source, prepare_members(tmp_path))
    location = tmp_path / "c1.tar"
    root = tmp_path / "target"
    receiver = direct.Receiver(receive_command(root), timeout=60, tag=TAG)
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the file changed after the daemon computed its digest
    location.write_bytes(data)
    with pytest.raises(MoveError, match="is not the one the source wrote"):
        receiver.finish(location, written)  # nothing followed: the whole file is sent (a resumed move)
    assert store_state(root) == ([], [], [])


def test_a_receiver_killed_mid_stream_fails_the_transfer_and_its_leftovers_go(tmp_path):
    source = tmp_path / "built.tar"
    written = write_archive(source, prepare_members(tmp_path))
    location = tmp_path / "c1.tar"
    root = tmp_path / "target"
    receiver = direct.Receiver(receive_command(root), timeout=60, tag=TAG)
    receiver.follow(location)
    tmp = archive_temp_path(location, "abc123")
    tmp.write_bytes(source.read_bytes()[:5000])
    time.sleep(1.0)  # the receiver has started and holds part of the archive
    os.killpg(receiver._proc.pid, 9)
    tmp.write_bytes(source.read_bytes())
    os.rename(tmp, location)
    with pytest.raises(MoveError, match="exited -9|exited 137"):
        receiver.finish(location, written)
    assert store_state(root) == ([], [], [])  # the next opener removed the dead receiver's partial files


def test_an_archive_gone_before_a_resumed_transfer_is_a_move_error(tmp_path):
    root = tmp_path / "target"
    receiver = direct.Receiver(receive_command(root), timeout=60, tag=TAG)
    with pytest.raises(MoveError, match="No such file"):
        receiver.finish(tmp_path / "gone.tar", None)
    receiver.cancel()
    assert store_state(root) == ([], [], [])


def test_a_receiver_that_cannot_start_fails_the_preflight(tmp_path):
    receiver = direct.Receiver("sh -c 'echo no store here >&2; exit 4' sh", timeout=60, tag=TAG)
    with pytest.raises(MoveError, match="exited 4: no store here"):
        receiver.wait_ready()
