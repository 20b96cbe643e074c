"""Unit tests of the pure parts of moves: the journal, the workload's JSON form, the readiness check."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cri_api import api_pb2 as cri
from pyshim.annotations import POD_IP_ANNOTATION, POD_MAC_ANNOTATION
from pyshim.migration import migrate
from pyshim.migration.host_restart import Manifest, SavedContainer
from pyshim.migration.journal import JournalLock, Phase, open_journal
from pyshim.migration.workload import MoveError, Workload, container_config_from, pod_config_with_address


def workload(cid="c1", pod="p1") -> Workload:
    return Workload(
        container_id=cid, pod_id=pod,
        container_config=cri.ContainerConfig(metadata=cri.ContainerMetadata(name="main"),
                                             image=cri.ImageSpec(image="busybox"), command=["sleep", "1"],
                                             annotations={"a": "b"}),
        pod_config=cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="web", namespace="ns", uid="u")),
        pod_ip="10.1.0.5", pod_mac="0a:58:0a:01:00:05", state=cri.CONTAINER_RUNNING,
        base_image="reg:5000/busybox@sha256:" + "a" * 64)


def test_workload_survives_its_json_form():
    w = workload()
    back = Workload.from_json(json.loads(json.dumps(w.to_json())))
    assert back == w and back.name == "main"


def test_recreated_configs_change_only_what_they_must():
    w = workload()
    restored = container_config_from(w.container_config, "/ckpt/c1.tar")
    assert restored.image.image == "/ckpt/c1.tar" and list(restored.command) == ["sleep", "1"]
    assert w.container_config.image.image == "busybox", "the original config was changed"
    pod = pod_config_with_address(w.pod_config, w.pod_ip, w.pod_mac)
    assert pod.annotations[POD_IP_ANNOTATION] == "10.1.0.5" and pod.annotations[POD_MAC_ANNOTATION] == w.pod_mac
    assert POD_IP_ANNOTATION not in w.pod_config.annotations


def test_journal_resumes_where_it_stopped(tmp_path):
    j = open_journal(tmp_path, "unix:///a", "unix:///b", "c1")
    assert j.phase == Phase.STARTED and not (tmp_path / "c1.json").exists()
    j.advance(Phase.CHECKPOINTED, workload=workload().to_json(), archive="/x/c1.tar")
    again = open_journal(tmp_path, "unix:///a", "unix:///b", "c1")
    assert again.phase == Phase.CHECKPOINTED and again.archive == "/x/c1.tar"
    assert Workload.from_json(again.workload).pod_ip == "10.1.0.5"
    with pytest.raises(MoveError, match="unfinished move"):
        open_journal(tmp_path, "unix:///a", "unix:///other", "c1")
    again.discard()
    assert open_journal(tmp_path, "unix:///a", "unix:///other", "c1").phase == Phase.STARTED


def test_journal_refuses_ids_that_would_name_other_files(tmp_path):
    with pytest.raises(MoveError):
        open_journal(tmp_path, "a", "b", "../../etc/passwd")


def test_one_move_of_a_container_at_a_time(tmp_path):
    with JournalLock(tmp_path, "c1"):
        with pytest.raises(MoveError, match="another"):
            with JournalLock(tmp_path, "c1"):
                pass
        with JournalLock(tmp_path, "c2"):
            pass


def test_manifest_groups_containers_by_pod_and_round_trips(tmp_path):
    m = Manifest(tmp_path)
    m.saved = [SavedContainer(workload("c1", "p1"), "/a"), SavedContainer(workload("c2", "p2"), "/b"),
               SavedContainer(workload("c3", "p1"), "/c")]
    m.save()
    loaded = Manifest(tmp_path).load()
    assert {pod: [s.archive for s in group] for pod, group in loaded.pods().items()} == {"p1": ["/a", "/c"],
                                                                                         "p2": ["/b"]}


class FakeRuntime:
    def __init__(self, ready=True, facts=None):
        self.ready, self.facts = ready, facts or {}

    def Status(self, request, timeout):
        return SimpleNamespace(status=SimpleNamespace(conditions=[SimpleNamespace(type="RuntimeReady",
                                                                                  status=self.ready)]),
                               info={"checkpointRestore": json.dumps(self.facts)})


def fake_client(**kwargs):
    return SimpleNamespace(runtime=FakeRuntime(**kwargs), timeout=5, endpoint="unix:///b.sock")


def test_target_that_cannot_restore_is_refused_with_its_reason():
    ok = {"restoreEnabled": True, "criuUsable": True}
    migrate._require_checkpoint_restore(fake_client(facts=ok), "restoreEnabled", "restore")
    with pytest.raises(MoveError, match="CRIU 3.17 is too old"):
        migrate._require_checkpoint_restore(
            fake_client(facts={"restoreEnabled": True, "criuUsable": False, "reason": "CRIU 3.17 is too old"}),
            "restoreEnabled", "restore")
    with pytest.raises(MoveError, match="switched off"):
        migrate._require_checkpoint_restore(fake_client(facts={"restoreEnabled": False, "criuUsable": True}),
                                            "restoreEnabled", "restore")
    with pytest.raises(MoveError, match="not ready"):
        migrate._require_checkpoint_restore(fake_client(ready=False, facts=ok), "restoreEnabled", "restore")


def test_transfer_rate_counts_push_and_pull():
    report = migrate.MigrationReport("c1", phases_ms={"push": 500, "pull": 500}, archive_bytes=100 << 20)
    assert migrate.transfer_rate(report) == 100.0


def test_a_direct_transfer_is_timed_from_its_first_byte_not_by_its_tail():
    report = migrate.MigrationReport("c1", phases_ms={"transfer": 50}, archive_bytes=100 << 20, stream_ms=400)
    assert migrate.transfer_rate(report) == 250.0
