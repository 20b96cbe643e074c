"""Checkpointer.recover: what a daemon killed mid-checkpoint left is thawed, deleted or kept."""
from pathlib import Path

import pytest

from pyshim.config import CheckpointSettings
from pyshim.checkpoint_restore import checkpoint as cp
from pyshim.internal.intents import IntentJournal, Operation
from pyshim.internal.runc import RuncState


class FakeRunc:
    def __init__(self, status: str | None):
        self.status = status
        self.resumed = 0

    def state(self, container_id):
        return None if self.status is None else RuncState(container_id, 7, self.status, "")

    def resume(self, container_id):
        self.resumed += 1
        self.status = "running"


@pytest.fixture
def parts(tmp_path, monkeypatch):
    monkeypatch.setattr(cp, "criu_availability", lambda version: None)
    journal = IntentJournal(tmp_path / "root" / "state" / "intents")

    def make(status):
        runc = FakeRunc(status)
        return cp.Checkpointer(CheckpointSettings(), runc, tmp_path / "root" / "checkpoint-work", intents=journal), runc
    return make, journal, tmp_path


def _begin(journal, tmp_path: Path, step: str, mode: str = "leave-running"):
    work = tmp_path / "root" / "checkpoint-work" / "c1-abc"
    (work / "checkpoint").mkdir(parents=True)
    location = tmp_path / "out" / "ckpt.tar"
    location.parent.mkdir(exist_ok=True)
    tmp = cp.archive_temp_path(location, "abc")
    tmp.write_bytes(b"partial")
    intent = journal.begin(Operation.CHECKPOINT_CONTAINER, "c1", step="prepare", work_dir=str(work),
                           archive_tmp=str(tmp), location=str(location), cgroups_path="/no/such/cgroup",
                           mode=mode)
    journal.advance(intent, step)
    return work, tmp, location


def test_a_container_frozen_by_a_killed_checkpoint_is_thawed_and_its_debris_deleted(parts):
    make, journal, tmp_path = parts
    work, tmp, location = _begin(journal, tmp_path, "dump")
    stray = tmp_path / "root" / "checkpoint-work" / "old-123"
    stray.mkdir()
    checkpointer, runc = make("paused")
    checkpointer.recover(journal.pending())
    assert runc.resumed == 1 and runc.status == "running"
    assert not work.exists() and not tmp.exists() and not location.exists() and not stray.exists()
    assert journal.pending() == []
    checkpointer.recover(journal.pending())  # idempotent
    assert runc.resumed == 1


def test_a_stopping_checkpoint_killed_before_its_kill_keeps_the_archive_and_the_container(parts):
    make, journal, tmp_path = parts
    work, tmp, location = _begin(journal, tmp_path, "kill", mode="stop")
    tmp.rename(location)  # the archive was complete and in place
    checkpointer, runc = make("paused")
    assert checkpointer.recover(journal.pending()) == []  # it runs on: nothing stopped it
    assert runc.status == "running"
    assert location.read_bytes() == b"partial" and not work.exists()


def test_a_stopping_checkpoint_killed_after_its_kill_reports_the_container_stopped_by_it(parts):
    make, journal, tmp_path = parts
    work, tmp, location = _begin(journal, tmp_path, "kill", mode="stop")
    tmp.rename(location)
    checkpointer, runc = make(None)  # the kill was done: runc knows the container no more
    stopped = checkpointer.recover(journal.pending())
    assert [(s.container_id, s.checkpoint.location, s.checkpoint.stopped) for s in stopped] == [
        ("c1", str(location), True)]
    assert stopped[0].checkpoint.time_ns == location.stat().st_mtime_ns
    assert location.is_file() and not work.exists() and journal.pending() == []


def test_a_checkpoint_killed_before_freezing_thaws_nothing(parts):
    make, journal, tmp_path = parts
    work, tmp, _ = _begin(journal, tmp_path, "prepare")
    checkpointer, runc = make("paused")  # paused by someone else: not ours to thaw
    checkpointer.recover(journal.pending())
    assert runc.resumed == 0 and not work.exists() and not tmp.exists()


def test_a_checkpoint_killed_in_criu_s_post_dump_hook_leaves_no_action_script_in_the_config(parts):
    make, journal, tmp_path = parts
    config = tmp_path / "bundle" / "criu.conf"
    config.parent.mkdir()
    config.write_text("tcp-close\naction-script /somewhere/criu-post-dump-hook\n")
    work = tmp_path / "root" / "checkpoint-work" / "c1-def"
    (work / "checkpoint").mkdir(parents=True)
    intent = journal.begin(Operation.CHECKPOINT_CONTAINER, "c1", step="prepare", work_dir=str(work),
                           archive_tmp="", location=str(tmp_path / "out.tar"), cgroups_path="/no/such/cgroup",
                           mode="leave-running", criu_config=str(config))
    journal.advance(intent, "dump")
    checkpointer, runc = make("running")  # CRIU thawed it when the hook read EOF
    checkpointer.recover(journal.pending())
    assert config.read_text() == "tcp-close\n" and runc.resumed == 0
    assert not work.exists() and journal.pending() == []
