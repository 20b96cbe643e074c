"""Unit tests of the pure parts of a pod move and of the host-restart manifest (version 2, and 1 still read)."""
from __future__ import annotations

import json

import pytest

from pyshim.migration.host_restart import MANIFEST_VERSION, Manifest, SavedPod
from pyshim.migration.pod_move import PodPhase, open_pod_journal
from pyshim.migration.test_migration_units import workload
from pyshim.migration.workload import MoveError


def test_a_pod_journal_resumes_where_it_stopped(tmp_path):
    journal = open_pod_journal(tmp_path, "unix:///a", "unix:///b", "p" * 64)
    assert journal.phase == PodPhase.STARTED and journal.path.endswith(f"pod-{'p' * 64}.json")
    journal.advance(PodPhase.RESTORING, workloads=[workload().to_json()], checkpoint="/w/ckpt",
                    target_containers={"main": "t1"})
    again = open_pod_journal(tmp_path, "unix:///a", "unix:///b", "p" * 64)
    assert again.phase == PodPhase.RESTORING and again.target_containers == {"main": "t1"}
    assert again.moved == [workload()]
    with pytest.raises(MoveError, match="rerun that one"):
        open_pod_journal(tmp_path, "unix:///a", "unix:///c", "p" * 64)
    with pytest.raises(MoveError, match="invalid"):
        open_pod_journal(tmp_path, "unix:///a", "unix:///b", "../escape")


def test_host_restart_manifest_keeps_pods_and_still_reads_version_1(tmp_path):
    manifest = Manifest(tmp_path)
    manifest.saved_pods.append(SavedPod([workload("c1"), workload("c2")], str(tmp_path / "p1")))
    manifest.save()
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["version"] == MANIFEST_VERSION
    back = Manifest(tmp_path).load()
    assert [w.container_id for w in back.saved_pods[0].workloads] == ["c1", "c2"] and not back.saved
    # What an earlier pyshim wrote: one archive per container, no version.
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"containers": [{"workload": workload("c9").to_json(), "archive": "/x/c9.tar"}]}))
    old = Manifest(tmp_path).load()
    assert [s.archive for s in old.saved] == ["/x/c9.tar"] and not old.saved_pods and not old.empty
