"""The first StartContainer of a RestorePod pod restores its containers together; the others then return."""
import threading
from types import SimpleNamespace

import pytest

from pyshim.errors import FailedPrecondition
from pyshim.internal.state import ContainerState
from pyshim.server import pod_restore_start as prs


class Record(SimpleNamespace):
    @property
    def pending_restore(self):
        return bool(self.restore_from) and not self.restored


def make_rt(tmp_path, ids, group=True):
    sandbox = SimpleNamespace(id="pod", pin_dir=str(tmp_path), netns_name="")
    records = {cid: Record(id=cid, sandbox_id="pod", restore_from=f"/ckpt/{cid}.tar", restored=False,
                           state=ContainerState.CREATED, reason="", message="") for cid in ids}
    if group:
        prs.record_group(sandbox, list(ids))

    def get(cid):
        return records[cid]
    rt = SimpleNamespace(sandboxes=SimpleNamespace(find=lambda sid: sandbox if sid == "pod" else None),
                         containers=SimpleNamespace(find=records.get, get=get, in_sandbox=lambda sid: list(records.values())))
    return rt, records


def test_the_first_start_restores_all_side_by_side_and_the_others_just_return(tmp_path):
    rt, records = make_rt(tmp_path, ["a", "b"])
    barrier = threading.Barrier(2, timeout=10)  # both restores must be in flight at once
    restored = []

    def restore_one(r):
        barrier.wait()
        r.restored, r.state = True, ContainerState.RUNNING
        restored.append(r.id)
    assert prs.start_with_pod(rt, records["a"], restore_one) is True
    assert sorted(restored) == ["a", "b"]
    assert prs.start_with_pod(rt, records["b"], restore_one) is True
    assert sorted(restored) == ["a", "b"], "the second StartContainer restored again"


def test_a_failure_is_reported_at_that_containers_own_start(tmp_path):
    rt, records = make_rt(tmp_path, ["a", "b"])

    def restore_one(r):
        if r.id == "b":
            r.state, r.reason, r.message = ContainerState.EXITED, "RestoreFailed", "CRIU said no"
            raise FailedPrecondition("restore of b failed: CRIU said no")
        r.restored, r.state = True, ContainerState.RUNNING
    assert prs.start_with_pod(rt, records["a"], restore_one) is True
    with pytest.raises(FailedPrecondition, match="CRIU said no"):
        prs.start_with_pod(rt, records["b"], restore_one)


def test_containers_outside_a_group_keep_their_own_start(tmp_path):
    rt, records = make_rt(tmp_path, ["a"], group=False)
    assert prs.start_with_pod(rt, records["a"], lambda r: pytest.fail("restored as a group")) is False
    plain = Record(id="p", sandbox_id="pod", restore_from="", restored=False, state=ContainerState.CREATED)
    assert prs.start_with_pod(rt, plain, lambda r: pytest.fail("restored")) is False


def test_the_per_pod_lock_is_forgotten_once_no_start_uses_it(tmp_path):
    rt, records = make_rt(tmp_path, ["a", "b"])

    def restore_one(r):
        assert "pod" in prs._locks, "the pod's lock is not held during its restore"
        r.restored, r.state = True, ContainerState.RUNNING
    prs.start_with_pod(rt, records["a"], restore_one)
    prs.start_with_pod(rt, records["b"], restore_one)
    assert "pod" not in prs._locks, "the lock map keeps an entry for every pod ever restored"


def test_concurrent_starts_of_one_pod_share_its_lock(tmp_path):
    first = prs._lock_for("pod")
    assert prs._lock_for("pod") is first
    del first
    assert "pod" not in prs._locks


def test_a_held_part_is_handed_once_and_closed_after_its_restore():
    import contextlib
    closed = []
    closing = contextlib.ExitStack()
    closing.callback(closed.append, "a")
    prs.hold_part("a", "open part of a", closing)
    with prs.held_part("a") as checkpoint:
        assert checkpoint == "open part of a" and closed == []
    assert closed == ["a"], "the part stays open after its restore"
    with prs.held_part("a") as checkpoint:
        assert checkpoint is None, "a part is handed to one restore only; another opens the file again"


def test_a_held_part_of_a_container_removed_before_its_start_is_closed():
    import contextlib
    closed = []
    closing = contextlib.ExitStack()
    closing.callback(closed.append, "b")
    prs.hold_part("b", "open part of b", closing)
    prs.release_part("b")
    assert closed == ["b"] and "b" not in prs._held
    prs.release_part("never-held")  # removing any other container is a no-op
