"""The pod checkpointer's ordering and clean-up, with runc and CRIU faked (integration tests run them for real)."""
import threading
import time
from pathlib import Path

import pytest

from cri_api import api_pb2 as cri
from criu_glue import archive_format as fmt
from criu_glue import pod_checkpoint as podfmt
from pyshim.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from pyshim.checkpoint_restore import pod_checkpoint as pc
from pyshim.checkpoint_restore.checkpoint import ArchiveMembers
from pyshim.internal.intents import IntentJournal, Operation
from pyshim.internal.runc import RuncError, RuncState
from pyshim.internal.state import ContainerMetadata, ContainerRecord, ContainerState, ContainerStatus


class FakeRunc:
    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self.paused: set[str] = set()
        self.lock = threading.Lock()

    def pause(self, cid):
        with self.lock:
            self.events.append(("pause", cid))
            self.paused.add(cid)

    def resume(self, cid):
        with self.lock:
            self.events.append(("resume", cid))
            self.paused.discard(cid)

    def state(self, cid):
        return RuncState(cid, 1, "paused" if cid in self.paused else "running", "")

    def kill(self, cid, signal="TERM", all_processes=False):
        with self.lock:
            self.events.append(("kill", cid))


class FakeCheckpointer:
    """Just the pieces of Checkpointer the pod checkpointer reuses."""

    def __init__(self, runc: FakeRunc, fail: set[str] = frozenset(), slow: float = 0.0, barrier=None):
        self.runc, self.fail, self.slow, self.barrier = runc, fail, slow, barrier
        self.locks: dict[str, threading.Lock] = {}

    def check_enabled(self):
        pass

    def _lock_for(self, cid):
        return self.locks.setdefault(cid, threading.Lock())

    def _dump_and_diff(self, record, work, members, lower_dirs, tcp, deadline, phases, netns_path=""):
        assert record.id in self.runc.paused, "dumped while not frozen"
        # Every selected container is frozen before any is dumped, and none thawed: the consistent cut.
        first_dump = next((i for i, e in enumerate(self.runc.events) if e[0] == "dump"), len(self.runc.events))
        assert not any(e[0] == "pause" for e in self.runc.events[first_dump:]), self.runc.events
        assert not any(e[0] == "resume" for e in self.runc.events), self.runc.events
        self.runc.events.append(("dump", record.id))
        if self.barrier is not None:
            self.barrier.wait()  # every dump must be in flight at once, or this breaks
        time.sleep(self.slow)
        if record.id in self.fail:
            raise FailedPrecondition(f"checkpoint of {record.id} failed: boom\nCRIU log (dump.log):\nError (criu/x)")
        (work / fmt.CHECKPOINT_DIR / "core-1.img").write_bytes(b"core")
        (work / fmt.CHECKPOINT_DIR / "inventory.img").write_bytes(b"inventory")
        return []

    def _thaw(self, record):
        self.runc.resume(record.id)


def record(cid: str, sandbox_id: str = "pod", state: ContainerState = ContainerState.RUNNING) -> ContainerRecord:
    return ContainerRecord(ContainerMetadata(id=cid, sandbox_id=sandbox_id, name=f"{cid}_pod", attempt=0, config_b64="",
                                             image_ref="i", image_id="i", image_name="i", created_at=0,
                                             dir=f"/nonexistent/{cid}", log_path=""),
                           ContainerStatus(state=state))


def part(cid: str) -> pc.PodPart:
    return pc.PodPart(record=record(cid), name=f"name-{cid}", config_doc={"metadata": {"name": f"name-{cid}"}},
                      members=ArchiveMembers(config=fmt.CheckpointConfig(id=cid, name=f"name-{cid}"), spec={},
                                             status=cri.ContainerStatus(), bind_mounts=[], log_path="", diff_exclusions=[]))


@pytest.fixture
def setup(tmp_path):
    runc = FakeRunc()
    journal = IntentJournal(tmp_path / "intents")
    out = tmp_path / "out"
    out.mkdir()

    def make(**kwargs):
        return pc.PodCheckpointer(FakeCheckpointer(runc, **kwargs), runc, journal, tmp_path / "work")
    return runc, journal, out, make


def test_all_frozen_before_any_dump_and_all_thawed_after(setup, tmp_path):
    runc, journal, out, make = setup
    manifest = make().checkpoint("pod", {"metadata": {}}, ["10.0.0.1"], [part("a"), part("b"), part("c")], out,
                                 pc.PodCheckpointOptions(tcp="established"), time.monotonic() + 30).manifest
    kinds = [e[0] for e in runc.events]
    assert kinds[:3] == ["pause"] * 3 and kinds[-3:] == ["resume"] * 3 and kinds.count("dump") == 3
    assert not runc.paused
    assert [c.name for c in manifest.containers] == ["name-a", "name-b", "name-c"]
    assert podfmt.read_manifest(out) == manifest
    assert sorted(p.name for p in (out / "containers").iterdir()) == ["0.tar", "1.tar", "2.tar"]
    assert journal.pending() == []
    assert list((tmp_path / "work").iterdir()) == []


def test_stop_mode_kills_all_while_frozen_once_the_checkpoint_is_complete(setup, tmp_path):
    runc, journal, out, make = setup
    seen_at_kill = []
    kill = runc.kill

    def kill_checking(cid, signal="TERM", all_processes=False):
        # Nothing ran after the image: still frozen, and the output complete, when the kill comes.
        seen_at_kill.append((cid in runc.paused, podfmt.is_pod_checkpoint(out)))
        kill(cid, signal, all_processes)
    runc.kill = kill_checking
    result = make().checkpoint("pod", {}, [], [part("a"), part("b")], out, pc.PodCheckpointOptions(tcp="established"),
                               time.monotonic() + 30, stop=True)
    assert result.stopped and seen_at_kill == [(True, True), (True, True)]
    kinds = [e[0] for e in runc.events]
    assert kinds.index("kill") > max(i for i, k in enumerate(kinds) if k == "dump")
    assert kinds[-2:] == ["resume", "resume"] and not runc.paused  # thawed after the kill: they die at once
    assert podfmt.read_manifest(out) == result.manifest
    assert journal.pending() == []


def test_stop_mode_failing_before_the_kill_thaws_all_and_kills_none(setup):
    runc, journal, out, make = setup
    with pytest.raises(FailedPrecondition):
        make(fail={"b"}).checkpoint("pod", {}, [], [part("a"), part("b")], out,
                                    pc.PodCheckpointOptions(tcp="established"), time.monotonic() + 30, stop=True)
    assert "kill" not in [e[0] for e in runc.events] and not runc.paused
    assert list(out.iterdir()) == []


def test_recovery_at_the_kill_step_keeps_the_complete_output(tmp_path):
    runc = FakeRunc()
    journal = IntentJournal(tmp_path / "intents")
    out = tmp_path / "out"
    (out / "containers").mkdir(parents=True)
    (out / "containers" / "0.tar").write_bytes(b"complete")
    (out / podfmt.MANIFEST).write_text("{}")
    journal.begin(Operation.CHECKPOINT_POD, "pod", step="kill", containers="a",
                  output_files=f"{out}/containers/0.tar\n{out}/{podfmt.MANIFEST}", work_dirs="", mode="stop")
    runc.pause("a")
    stopped = []
    assert pc.recover_pod_checkpoints(journal, runc, stopped) == ["a"]
    assert not runc.paused and (out / podfmt.MANIFEST).exists() and (out / "containers" / "0.tar").exists()
    # Container "a" is reported as stopped by this checkpoint, its part as the location.
    assert [(s.container_id, s.checkpoint.location, s.checkpoint.stopped) for s in stopped] == \
        [("a", f"{out}/containers/0.tar", True)]
    assert journal.pending() == []


def test_dumps_run_side_by_side(setup):
    runc, journal, out, make = setup
    # A barrier of four: sequential dumps would never all reach it (BrokenBarrierError after 20 s).
    make(barrier=threading.Barrier(4, timeout=20)).checkpoint(
        "pod", {}, [], [part("a"), part("b"), part("c"), part("d")], out,
        pc.PodCheckpointOptions(tcp="established"), time.monotonic() + 60)
    assert podfmt.is_pod_checkpoint(out)


def test_criu_failing_on_the_second_of_three_thaws_all_and_leaves_the_directory_empty(setup, tmp_path):
    runc, journal, out, make = setup
    with pytest.raises(FailedPrecondition) as err:
        make(fail={"b"}).checkpoint("pod", {}, [], [part("a"), part("b"), part("c")], out,
                                    pc.PodCheckpointOptions(tcp="established"), time.monotonic() + 30)
    assert "checkpoint of b failed" in err.value.message and "CRIU log" in err.value.message
    assert not runc.paused and [e for e in runc.events if e[0] == "resume"].__len__() == 3
    assert list(out.iterdir()) == []
    assert out.is_dir()
    assert journal.pending() == []
    assert list((tmp_path / "work").iterdir()) == []


def test_a_failed_freeze_thaws_those_already_frozen(setup):
    runc, journal, out, make = setup
    original = runc.pause

    def pause(cid):
        if cid == "b":
            raise RuncError("runc pause: cannot freeze")
        original(cid)
    runc.pause = pause
    with pytest.raises(FailedPrecondition, match="cannot freeze container b"):
        make().checkpoint("pod", {}, [], [part("a"), part("b")], out, pc.PodCheckpointOptions(tcp="established"),
                          time.monotonic() + 30)
    assert not runc.paused and ("resume", "a") in runc.events


def test_past_the_deadline_nothing_is_written(setup):
    runc, journal, out, make = setup
    with pytest.raises(DeadlineExceeded):
        make(slow=0.3).checkpoint("pod", {}, [], [part("a")], out, pc.PodCheckpointOptions(tcp="established"),
                                  time.monotonic() + 0.2)
    assert not runc.paused and list(out.iterdir()) == []


def test_recovery_thaws_what_a_killed_daemon_left_frozen(tmp_path):
    runc = FakeRunc()
    journal = IntentJournal(tmp_path / "intents")
    out = tmp_path / "out"
    (out / "containers").mkdir(parents=True)
    (out / "containers" / "0.tar").write_bytes(b"partial")
    work = tmp_path / "work-a"
    work.mkdir()
    journal.begin(Operation.CHECKPOINT_POD, "pod", step="frozen", containers="a,b",
                  output_files=f"{out}/containers/0.tar\n{out}/containers/1.tar\n{out}/{podfmt.MANIFEST}",
                  work_dirs=str(work))
    runc.pause("a")
    runc.pause("b")
    assert sorted(pc.recover_pod_checkpoints(journal, runc)) == ["a", "b"]
    assert not runc.paused
    assert list(out.iterdir()) == [] and not work.exists()
    assert journal.pending() == []


def test_options():
    assert pc.PodCheckpointOptions.parse({}) == pc.PodCheckpointOptions("none", "auto")
    assert pc.PodCheckpointOptions.parse({"compression": "zstd", "tcp": "close"}) == \
        pc.PodCheckpointOptions("zstd", "close")
    for bad in ({"compression": "lz4"}, {"tcp": "never"}, {"leave-running": "true"}):
        with pytest.raises(InvalidArgument):
            pc.PodCheckpointOptions.parse(bad)


def test_output_dir_validation(tmp_path):
    assert pc.validate_output_dir(str(tmp_path)) == tmp_path
    for bad in ("", "relative", str(tmp_path / "missing")):
        with pytest.raises(InvalidArgument):
            pc.validate_output_dir(bad)
    (tmp_path / "f").write_text("x")
    with pytest.raises(InvalidArgument, match="not empty"):
        pc.validate_output_dir(str(tmp_path))
    with pytest.raises(InvalidArgument, match="not an existing directory"):
        pc.validate_output_dir(str(tmp_path / "f"))


def test_selection_validation():
    a, other, exited = record("a"), record("x", sandbox_id="elsewhere"), record("e", state=ContainerState.EXITED)
    found = {"a": a, "x": other, "e": exited}.get
    assert pc.validate_selection("pod", ["a"], found) == [a]
    for ids in ([], ["a", "a"], ["a", "x"], ["missing"]):
        with pytest.raises(InvalidArgument):
            pc.validate_selection("pod", ids, found)
    with pytest.raises(FailedPrecondition, match="EXITED"):
        pc.validate_selection("pod", ["e"], found)
