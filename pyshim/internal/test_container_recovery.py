"""ContainerManager's status transitions and start-up recovery, with a fake runc (no real containers)."""
import threading
import time
from pathlib import Path

import pytest

from pyshim.checkpoint_restore.records import CheckpointFacts
from pyshim.internal import crashpoints
from pyshim.internal.container_manager import ContainerManager
from pyshim.internal.events import EventBus, EventType
from pyshim.internal.intents import IntentJournal, Operation
from pyshim.internal.runc import RuncState
from pyshim.checkpoint_restore.records import RestoreOrigin
from pyshim.internal.state import ContainerMetadata, ContainerRecord, ContainerState, ContainerStatus


class FakeRunc:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.status: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        self.calls: list[tuple] = []

    def add(self, container_id: str, status: str, pid: int = 0) -> None:
        (self.root / container_id).mkdir(exist_ok=True)
        self.status[container_id] = status
        self.pids[container_id] = pid

    def state(self, container_id):
        if container_id not in self.status:
            return None
        return RuncState(container_id, self.pids.get(container_id, 0), self.status[container_id], "")

    def kill(self, container_id, signal="TERM", all_processes=False):
        self.calls.append(("kill", container_id, signal))

    def delete(self, container_id, force=False):
        self.calls.append(("delete", container_id))
        self.status.pop(container_id, None)
        (self.root / container_id).rmdir() if (self.root / container_id).is_dir() else None

    def states(self):
        return {i: self.state(i) for i in self.status}

    def start(self, container_id):
        self.status[container_id] = "running"


def _manager(tmp_path: Path, runc: FakeRunc | None = None, events: EventBus | None = None):
    runc = runc or FakeRunc(tmp_path / "runc")
    journal = IntentJournal(tmp_path / "root" / "state" / "intents")
    manager = ContainerManager(tmp_path / "root", tmp_path / "state", runc, conmon=None, image_store=None,
                               events=events or EventBus(), intents=journal)
    return manager, runc, journal


def _record(manager: ContainerManager, container_id: str, state: ContainerState, restore_from: str = "",
            **status) -> ContainerRecord:
    cdir = manager._root / container_id
    for sub in ("", "upper", "work", "rootfs"):
        (cdir / sub).mkdir(parents=True, exist_ok=True)
    metadata = ContainerMetadata(id=container_id, sandbox_id="pod", name=f"k8s_{container_id}", attempt=0,
                                 config_b64="", image_ref="busybox", image_id="sha256:x", image_name="busybox",
                                 created_at=time.time_ns(), dir=str(cdir), log_path="",
                                 restore=RestoreOrigin(restore_from) if restore_from else None)
    record = ContainerRecord(metadata, ContainerStatus(state=state, **status))
    manager.add(record)
    manager._names[record.name] = record.id
    return record


def _drain(q) -> list:
    found = []
    while not q.empty():
        found.append(q.get_nowait())
    return found


def test_many_threads_noticing_one_exit_send_exactly_one_stopped_event(tmp_path):
    events = EventBus()
    manager, runc, _ = _manager(tmp_path, events=events)
    manager.publish_pending_stops()  # serving
    record = _record(manager, "c1", ContainerState.RUNNING, pid=42, started_at=1)
    runc.add("c1", "running", 42)
    q = events.subscribe()
    (manager._exit_dir / "c1").write_text("3")
    barrier = threading.Barrier(16)

    def poll():
        barrier.wait()
        manager.refresh(record)
        manager.all()
    threads = [threading.Thread(target=poll) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stopped = [e for e in _drain(q) if e.type == EventType.STOPPED]
    assert [e.container_id for e in stopped] == ["c1"]
    assert (record.state, record.exit_code, record.reason) == (ContainerState.EXITED, 3, "Error")


def test_an_exit_while_the_daemon_was_down_is_published_once_after_recovery(tmp_path):
    events = EventBus()
    manager, runc, journal = _manager(tmp_path, events=events)
    _record(manager, "c1", ContainerState.RUNNING, pid=42, started_at=1)
    (manager._exit_dir / "c1").write_text("0")
    runc.add("c1", "stopped")

    manager2, _, _ = _manager(tmp_path, runc=runc, events=events)
    manager2.load()
    q = events.subscribe()
    manager2.recover(journal.pending())
    assert _drain(q) == []  # nobody can hear it before the server serves
    manager2.publish_pending_stops()
    assert [(e.container_id, e.type) for e in _drain(q)] == [("c1", EventType.STOPPED)]

    manager3, _, _ = _manager(tmp_path, runc=runc, events=events)  # and not again at the next start
    manager3.load()
    manager3.recover(journal.pending())
    manager3.publish_pending_stops()
    assert _drain(q) == []


def test_a_start_killed_before_the_save_is_recorded_running(tmp_path):
    manager, runc, journal = _manager(tmp_path)
    _record(manager, "c1", ContainerState.CREATED)
    runc.add("c1", "running", pid=1)  # pid 1 exists: its start time is readable
    journal.begin(Operation.START_CONTAINER, "c1")
    manager2, _, _ = _manager(tmp_path, runc=runc)
    manager2.load()
    manager2.recover(journal.pending())
    record = manager2.find("c1")
    assert (record.state, record.pid) == (ContainerState.RUNNING, 1)
    assert 0 < record.started_at <= time.time_ns()
    assert journal.pending() == []


def test_runc_containers_and_dirs_with_no_record_are_removed(tmp_path):
    manager, runc, journal = _manager(tmp_path)
    _record(manager, "kept", ContainerState.CREATED)
    runc.add("kept", "created")
    runc.add("orphan", "created")  # a CreateContainer killed after `runc create`, before its record
    (manager._root / "orphan" / "rootfs").mkdir(parents=True)
    (manager._root / "dironly").mkdir()
    (manager._exit_dir / "orphan").write_text("137")
    journal.begin(Operation.CREATE_CONTAINER, "orphan", dir=str(manager._root / "orphan"))
    manager.recover(journal.pending())
    assert sorted(p.name for p in manager._root.iterdir()) == ["kept"]
    assert ("delete", "orphan") in runc.calls and ("delete", "kept") not in runc.calls
    assert list(manager._exit_dir.iterdir()) == []
    assert manager.find("kept").state == ContainerState.CREATED
    assert journal.pending() == []


def test_two_concurrent_removes_send_one_deleted_event(tmp_path, monkeypatch):
    events = EventBus()
    manager, runc, _ = _manager(tmp_path, events=events)
    _record(manager, "c1", ContainerState.EXITED)
    monkeypatch.setattr("pyshim.internal.mounts.unmount", lambda path: None)
    q = events.subscribe()
    threads = [threading.Thread(target=manager.remove, args=("c1",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.type for e in _drain(q)] == [EventType.DELETED]


class _Killed(BaseException):
    """The daemon SIGKILLed at a crash point: nothing after it runs."""


@pytest.mark.parametrize("point", ["container_exit:publish", "container_exit:mark_sent"])
def test_a_daemon_killed_while_publishing_an_exit_publishes_it_after_its_restart(tmp_path, monkeypatch, point):
    events = EventBus()
    manager, runc, journal = _manager(tmp_path, events=events)
    manager.publish_pending_stops()  # serving
    record = _record(manager, "c1", ContainerState.RUNNING, pid=42, started_at=1)
    runc.add("c1", "stopped")
    (manager._exit_dir / "c1").write_text("0")
    q = events.subscribe()

    def reached(name):
        if name == point:
            raise _Killed(name)
    monkeypatch.setattr(crashpoints, "reached", reached)
    with pytest.raises(_Killed):
        manager.refresh(record)
    monkeypatch.undo()
    before = [e.type for e in _drain(q)]
    assert before == ([] if point == "container_exit:publish" else [EventType.STOPPED])

    manager2, _, _ = _manager(tmp_path, runc=runc, events=events)
    manager2.load()
    manager2.recover(journal.pending())
    manager2.publish_pending_stops()
    # Lost never; sent twice only when the kill fell between the publish and its mark.
    assert [(e.container_id, e.type) for e in _drain(q)] == [("c1", EventType.STOPPED)]
    manager3, _, _ = _manager(tmp_path, runc=runc, events=events)
    manager3.load()
    manager3.recover(journal.pending())
    manager3.publish_pending_stops()
    assert _drain(q) == []


def test_a_container_killed_by_a_stopping_checkpoint_is_reported_checkpointed_not_failed(tmp_path):
    manager, runc, journal = _manager(tmp_path)
    _record(manager, "c1", ContainerState.RUNNING, pid=42, started_at=1)
    (manager._exit_dir / "c1").write_text("137")  # SIGKILL, as the checkpoint's kill leaves it
    manager2, _, _ = _manager(tmp_path, runc=runc)
    manager2.load()
    manager2.recover(journal.pending())
    assert manager2.find("c1").reason == "Error"  # all that the exit alone says
    manager2.note_stopped_by_checkpoint("c1", CheckpointFacts("/out/ckpt.tar", 5, stopped=True))
    record = manager2.find("c1")
    assert (record.state, record.exit_code, record.reason) == (ContainerState.EXITED, 137, "Checkpointed")
    assert "/out/ckpt.tar" in record.message and record.last_checkpoint.location == "/out/ckpt.tar"
