"""The container record: frozen metadata + frozen status, its on-disk form (today's and the flat one
written before the split), and the one way its status changes."""
import dataclasses
import json
import threading

import pytest

from pyshim.checkpoint_restore.records import CheckpointFacts, RestoredFacts, RestoreOrigin
from pyshim.errors import AlreadyExists
from pyshim.internal.container_manager import ContainerManager
from pyshim.internal.events import EventBus
from pyshim.internal.state import (CONTAINER_RECORD_VERSION, ContainerMetadata, ContainerRecord, ContainerState,
                                   ContainerStatus, RecordStore)

# A record exactly as the daemon wrote it before the metadata/status split (version 1, flat): a
# restored container, checkpointed since. A node upgraded across the split must keep it.
FLAT_RECORD = {
    "id": "c0ffee", "sandbox_id": "pod1", "name": "k8s_web_pod_default_uid_0", "attempt": 0,
    "config_b64": "", "image_ref": "/var/lib/ckpt/web.tar", "image_id": "/var/lib/ckpt/web.tar",
    "image_name": "/var/lib/ckpt/web.tar", "created_at": 1700000000000000000,
    "dir": "/var/lib/pyshim/containers/c0ffee", "log_path": "/var/log/pods/web/0.log",
    "cgroups_path": "/kubepods/pod1/c0ffee", "stop_signal": "TERM", "state": "RUNNING", "pid": 4242,
    "started_at": 1700000001000000000, "finished_at": 0, "exit_code": 0, "reason": "", "message": "",
    "checkpointed_at": 1700000002000000000, "checkpoint_location": "/tmp/out.tar",
    "last_checkpoint": {"frozenMs": 12.5, "totalMs": 80.1, "archiveBytes": 4096, "tcpEstablished": True,
                        "stopped": False, "phasesMs": {"dump": 10.0}},
    "restore_from": "/var/lib/ckpt/web.tar", "base_image_id": "sha256:" + "b" * 64, "restored": True,
    "restore_tcp": "established", "restored_checkpoint_time": 1690000000000000000,
    "restore_phases_ms": {"unpack": 3.5}, "stopped_event_sent": True,
}


def _record(tmp_path, **status) -> ContainerRecord:
    metadata = ContainerMetadata(id="c1", sandbox_id="pod", name="k8s_c1", attempt=1, config_b64="",
                                 image_ref="busybox", image_id="sha256:x", image_name="busybox", created_at=1,
                                 dir=str(tmp_path / "c1"), log_path="", cgroups_path="/pods/c1",
                                 restore=RestoreOrigin("/ckpt.tar", checkpoint_time_ns=5))
    return ContainerRecord(metadata, ContainerStatus(**status))


def test_a_record_with_every_sub_record_survives_a_round_trip_through_the_store(tmp_path):
    record = _record(tmp_path, state=ContainerState.EXITED, pid=0, started_at=2, finished_at=3, exit_code=137,
                     reason="Checkpointed", message="stopped", stopped_event_sent=False,
                     last_checkpoint=CheckpointFacts("/out.tar", 9, frozen_ms=1.5, total_ms=2.5, archive_bytes=7,
                                                     tcp_established=True, stopped=True, phases_ms={"dump": 1.0}),
                     restored=RestoredFacts("sha256:base", tcp="close", phases_ms={"unpack": 2.0}))
    RecordStore(tmp_path / "records", ContainerRecord).save(record)
    store = RecordStore(tmp_path / "records", ContainerRecord)
    store.load()
    loaded = store.get("c1")
    assert loaded.metadata == record.metadata and loaded.status == record.status
    doc = json.loads((tmp_path / "records" / "c1.json").read_text())
    assert doc["metadata"]["version"] == CONTAINER_RECORD_VERSION


def test_a_flat_record_written_before_the_split_loads_with_its_facts_typed(tmp_path):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "c0ffee.json").write_text(json.dumps(FLAT_RECORD))
    store = RecordStore(tmp_path / "records", ContainerRecord)
    store.load()
    record = store.get("c0ffee")
    assert record is not None, "an upgraded node lost its container"
    assert (record.id, record.sandbox_id, record.dir, record.cgroups_path) == (
        "c0ffee", "pod1", "/var/lib/pyshim/containers/c0ffee", "/kubepods/pod1/c0ffee")
    assert (record.state, record.pid, record.started_at) == (ContainerState.RUNNING, 4242, 1700000001000000000)
    assert record.metadata.restore == RestoreOrigin("/var/lib/ckpt/web.tar", 1690000000000000000)
    assert record.status.restored == RestoredFacts("sha256:" + "b" * 64, "established", {"unpack": 3.5})
    assert record.status.last_checkpoint == CheckpointFacts(
        "/tmp/out.tar", 1700000002000000000, frozen_ms=12.5, total_ms=80.1, archive_bytes=4096,
        tcp_established=True, stopped=False, phases_ms={"dump": 10.0})
    assert not record.pending_restore and record.base_image_id == "sha256:" + "b" * 64
    # Saved again (its next status change), it is written in today's form and reads back the same.
    store.save(record)
    again = RecordStore(tmp_path / "records", ContainerRecord)
    again.load()
    assert "metadata" in json.loads((tmp_path / "records" / "c0ffee.json").read_text())
    assert again.get("c0ffee").status == record.status


def test_a_flat_record_created_for_restore_and_not_yet_started_is_still_pending(tmp_path):
    flat = {k: v for k, v in FLAT_RECORD.items() if k not in ("last_checkpoint", "checkpointed_at")}
    flat.update(state="CREATED", pid=0, restored=False, base_image_id="", restore_tcp="", restore_phases_ms={})
    (tmp_path / "c0ffee.json").write_text(json.dumps(flat))
    store = RecordStore(tmp_path, ContainerRecord)
    store.load()
    record = store.get("c0ffee")
    assert record.pending_restore and record.status.last_checkpoint is None


def test_a_record_of_a_newer_daemon_is_skipped_and_its_file_kept(tmp_path):
    doc = _record(tmp_path).to_doc()
    doc["metadata"]["version"] = CONTAINER_RECORD_VERSION + 1
    (tmp_path / "c1.json").write_text(json.dumps(doc))
    store = RecordStore(tmp_path, ContainerRecord)
    store.load()
    assert store.get("c1") is None and (tmp_path / "c1.json").exists()


def test_nothing_but_update_status_can_write_a_container_record(tmp_path):
    record = _record(tmp_path, last_checkpoint=CheckpointFacts("/out.tar", 1, phases_ms={"dump": 1.0}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.state = ContainerState.RUNNING
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status.pid = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.metadata.dir = "/elsewhere"
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = ContainerStatus()
    with pytest.raises(TypeError):
        record.status.last_checkpoint.phases_ms["dump"] = 2.0
    assert record.state == ContainerState.CREATED and record.last_checkpoint.phases_ms["dump"] == 1.0


def _manager_with(tmp_path, record: ContainerRecord) -> ContainerManager:
    manager = ContainerManager(tmp_path / "root", tmp_path / "state", runc=None, conmon=None, image_store=None,
                               events=EventBus())
    manager.add(record)
    return manager


def test_update_status_changes_the_status_under_the_containers_lock_and_saves_it_first(tmp_path):
    record = _record(tmp_path)
    manager = _manager_with(tmp_path, record)
    lock_taken_elsewhere = []

    def to_running(status: ContainerStatus) -> ContainerStatus:
        # Another thread must not get the container's lock while a change is made.
        probe = threading.Thread(target=lambda: lock_taken_elsewhere.append(
            manager.lock_for(record.id).acquire(blocking=False)))
        probe.start()
        probe.join()
        return dataclasses.replace(status, state=ContainerState.RUNNING, pid=7)

    assert manager.update_status(record, to_running)
    assert lock_taken_elsewhere == [False]
    assert (record.state, record.pid) == (ContainerState.RUNNING, 7)  # every holder of the record sees it
    saved = json.loads((tmp_path / "root" / "state" / "containers" / "c1.json").read_text())
    assert (saved["status"]["state"], saved["status"]["pid"]) == ("RUNNING", 7)
    assert not manager.update_status(record, lambda status: None)  # a transition that no longer applies


def test_a_status_that_cannot_be_saved_is_not_taken(tmp_path, monkeypatch):
    record = _record(tmp_path)
    manager = _manager_with(tmp_path, record)

    def disk_full(path, doc):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("pyshim.internal.state.write_json_atomic", disk_full)
    with pytest.raises(OSError):
        manager.update_status(record, lambda s: dataclasses.replace(s, state=ContainerState.RUNNING))
    assert record.state == ContainerState.CREATED


def test_a_stale_record_is_not_updated(tmp_path):
    record = _record(tmp_path)
    manager = _manager_with(tmp_path, record)
    copy = ContainerRecord(record.metadata, record.status)  # e.g. held across a remove and re-create
    assert not manager.update_status(copy, lambda s: dataclasses.replace(s, pid=9))
    assert record.pid == 0 and copy.pid == 0


def test_facts_without_figures_are_valid(tmp_path):
    # A restore adopted by recovery knows its base image and TCP mode but has no phase timings.
    adopted = _record(tmp_path, restored=RestoredFacts("sha256:base", tcp="none"))
    assert dict(adopted.status.restored.phases_ms) == {} and not adopted.pending_restore
    assert ContainerRecord.from_doc(adopted.to_doc()).status == adopted.status


def test_a_stored_record_cannot_be_replaced_by_adding_another_with_its_id(tmp_path):
    record = _record(tmp_path)
    manager = _manager_with(tmp_path, record)
    with pytest.raises(AlreadyExists):
        manager.add(ContainerRecord(record.metadata, ContainerStatus(state=ContainerState.RUNNING)))
    assert manager.recorded("c1") is record and record.state == ContainerState.CREATED
