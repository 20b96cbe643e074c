"""Conmon.reopen_log against a stand-in for conmon's end of the control fifo."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pyshim.errors import DeadlineExceeded
from pyshim.internal.conmon import Conmon, MonitorPaths


@pytest.fixture
def paths(tmp_path) -> MonitorPaths:
    os.mkfifo(tmp_path / "ctl")
    return MonitorPaths(bundle=tmp_path, exit_dir=tmp_path, persist_dir=tmp_path, attach_dir=tmp_path)


def fake_conmon(paths: MonitorPaths, log_path: Path, delay: float, reopen: bool = True) -> threading.Thread:
    """Reads one control message; after `delay`, replaces the log as conmon does (new file, rename)."""
    # Opened read-write, as conmon holds it: open at once, and never an EOF while it is open.
    fifo = open(os.open(paths.control_fifo, os.O_RDWR), "rb", buffering=0)
    received = []

    def run():
        with fifo:
            received.append(fifo.readline())
            time.sleep(delay)
            if reopen:
                tmp = log_path.with_name(log_path.name + ".tmp")
                tmp.write_text("")
                os.rename(tmp, log_path)

    thread = threading.Thread(target=run, daemon=True)
    thread.received = received
    thread.start()
    return thread


def test_returns_only_once_the_rotated_log_is_back(paths, tmp_path):
    log_path = tmp_path / "ctr.log"
    log_path.write_text("old\n")
    os.rename(log_path, tmp_path / "ctr.log.1")  # kubelet's rotation
    conmon = fake_conmon(paths, log_path, delay=0.2)

    Conmon.reopen_log(paths, log_path, timeout=10)

    assert log_path.exists(), "returned before conmon made the new log file"
    conmon.join(5)
    assert conmon.received == [b"2 0 0\n"]


def test_waits_for_a_new_file_when_the_log_was_not_moved(paths, tmp_path):
    log_path = tmp_path / "ctr.log"
    log_path.write_text("old\n")
    fake_conmon(paths, log_path, delay=0.2)

    Conmon.reopen_log(paths, log_path, timeout=10)

    assert log_path.read_text() == "", "returned while the old file was still in place"


def test_deadline_exceeded_when_conmon_never_reopens(paths, tmp_path):
    log_path = tmp_path / "ctr.log"
    fake_conmon(paths, log_path, delay=0, reopen=False)

    with pytest.raises(DeadlineExceeded, match="did not reopen the log"):
        Conmon.reopen_log(paths, log_path, timeout=0.2)
