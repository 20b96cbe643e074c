"""A `pyshim checkpoint-image receive` killed mid-stream, or between storing the blob and recording the
image, leaves nothing after the daemon's start-up recovery; a receive still running is left alone.

The receiver is the real CLI in a child process, fed through a pipe that the test controls, and killed
at a point the test waits for (or at its crash point): deterministic, nothing timed."""
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from oci.store import ImageStore
from pyshim.checkpoint_restore.test_restore import _archive
from pyshim.internal import image_receives
from pyshim.internal.crashpoints import ENV as CRASH_ENV
from pyshim.internal.intents import IntentJournal, Operation

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="pyshim-receives-test-") as d:
        yield Path(d)


def _archive_bytes(tmp_path: Path) -> tuple[bytes, str]:
    data = _archive(tmp_path / "a.tar").read_bytes()
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def _receiver(root: Path, digest: str, size: int, crash_at: str = "") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.Popen([sys.executable, "-m", "pyshim", "checkpoint-image", "receive", "--root", str(root),
                             "--tag", "localhost/moved:1", "--digest", digest, "--size", str(size)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=env)


def _wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + 60  # a bound on a hung child, not a timing assertion
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _receive_files(root: Path) -> list[Path]:
    tmp = root / "images" / "tmp"
    return [p for p in tmp.rglob("*")] if tmp.is_dir() else []


def _daemon_recovery(root: Path) -> tuple[ImageStore, IntentJournal]:
    store = ImageStore(root / "images")
    journal = IntentJournal(root / "state" / "intents")
    image_receives.recover(store, journal, journal.pending())
    return store, journal


def _streaming_receiver(tmp_path: Path) -> tuple[subprocess.Popen, bytes, str]:
    """A receiver that got half the archive and waits for the rest, its partial blob on disk."""
    data, digest = _archive_bytes(tmp_path)
    proc = _receiver(tmp_path / "root", digest, len(data))
    proc.stdin.write(data[:len(data) // 2])
    proc.stdin.flush()
    # (The store reads the stream in large chunks: the partial blob exists, its bytes may still be buffered.)
    _wait_until(lambda: any(p.name.startswith("blob-") for p in _receive_files(tmp_path / "root")),
                "the receiver never opened its partial blob")
    return proc, data, digest


def test_a_receiver_killed_mid_stream_leaves_nothing_even_beside_another_store_user(tmp_path):
    proc, _, _ = _streaming_receiver(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Another user of the store (e.g. an import) keeps the store from clearing tmp/ at open.
    other_user = ImageStore(tmp_path / "root" / "images")
    try:
        store, journal = _daemon_recovery(tmp_path / "root")
        assert _receive_files(tmp_path / "root") == [], "the killed receive's partial files were kept"
        assert journal.pending() == [] and store.list() == []
    finally:
        other_user.close()


def test_a_receiver_killed_after_storing_the_blob_leaves_no_unused_blob(tmp_path):
    data, digest = _archive_bytes(tmp_path)
    proc = _receiver(tmp_path / "root", digest, len(data), crash_at="receive_checkpoint_image:record")
    proc.communicate(data)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Killed with the blob (and its unpacked CRIU images) stored and no image recorded.
    store = ImageStore(tmp_path / "root" / "images")
    assert store.has_blob(digest) and store.list() == []
    store.close()
    store, journal = _daemon_recovery(tmp_path / "root")
    assert not store.has_blob(digest) and not store.has_unpacked_checkpoint(digest)
    assert journal.pending() == []


def test_a_receive_still_streaming_is_left_alone_and_completes(tmp_path):
    proc, data, digest = _streaming_receiver(tmp_path)
    try:
        store, journal = _daemon_recovery(tmp_path / "root")  # the daemon restarts meanwhile
        assert [i.operation for i in journal.pending()] == [Operation.RECEIVE_CHECKPOINT_IMAGE]
        assert _receive_files(tmp_path / "root"), "recovery removed the files of a live receive"
        proc.communicate(data[len(data) // 2:])
        assert proc.returncode == 0, proc.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [i.repo_tags for i in store.list()] == [["localhost/moved:1"]] and store.has_blob(digest)
    assert journal.pending() == [] and _receive_files(tmp_path / "root") == []


def test_recovery_keeps_a_blob_an_image_uses_and_never_removes_outside_tmp(tmp_path):
    root = tmp_path / "root"
    data, digest = _archive_bytes(tmp_path)
    proc = _receiver(root, digest, len(data))
    proc.communicate(data)
    assert proc.returncode == 0, proc.stderr
    journal = IntentJournal(root / "state" / "intents")
    outside = tmp_path / "outside"
    outside.mkdir()
    journal.begin(Operation.RECEIVE_CHECKPOINT_IMAGE, "localhost/moved:1", digest=digest, scratch=str(outside),
                  pid="0", started_ns="0")
    store, journal = _daemon_recovery(root)
    assert store.has_blob(digest) and outside.is_dir() and journal.pending() == []
