"""RestorePod's intent and its start-up repair, with fake managers (no real sandboxes or containers)."""
from types import SimpleNamespace

import pytest

from pyshim.checkpoint_restore import pod_restore_journal as prj
from pyshim.errors import FailedPrecondition
from pyshim.internal.intents import IntentJournal, Operation


class FakeContainers:
    def __init__(self, records: dict[str, str], fail: set[str] = frozenset(), dirs: set[str] = frozenset()):
        self.records = dict(records)  # container id -> sandbox id
        self.fail = set(fail)
        self.dirs = set(dirs)  # ids whose directory exists without a record
        self.calls: list[tuple[str, str]] = []

    def container_dir(self, container_id):
        return SimpleNamespace(exists=lambda: container_id in self.dirs)

    def find(self, container_id):
        return SimpleNamespace(id=container_id) if container_id in self.records else None

    def in_sandbox(self, sandbox_id):
        return [SimpleNamespace(id=c) for c, s in self.records.items() if s == sandbox_id]

    def remove(self, container_id):
        self.calls.append(("remove", container_id))
        if container_id in self.fail:
            raise FailedPrecondition(f"container {container_id} will not go")
        self.records.pop(container_id, None)

    def remove_leftovers(self, container_id, cgroups_path):
        self.calls.append(("leftovers", container_id))


class FakeSandboxes:
    def __init__(self, ids, fail: bool = False, calls: list | None = None):
        self.ids = set(ids)
        self.fail = fail
        self.calls = calls if calls is not None else []

    def find(self, sandbox_id):
        return SimpleNamespace(id=sandbox_id) if sandbox_id in self.ids else None

    def stop(self, sandbox_id):
        self.calls.append(("stop", sandbox_id))

    def remove(self, sandbox_id):
        self.calls.append(("remove_pod", sandbox_id))
        if self.fail:
            raise FailedPrecondition("processes still run in its cgroup")
        self.ids.discard(sandbox_id)


@pytest.fixture
def journal(tmp_path):
    return IntentJournal(tmp_path / "intents")


def open_restore(journal, containers=2):
    """A RestorePod intent as a killed call leaves it: open, naming a sandbox and `containers` ids."""
    with pytest.raises(SystemExit):
        with prj.track(journal, "/ckpt/web", containers) as restore:
            restore.left = ["(simulated kill: the intent must stay open)"]
            raise SystemExit
    [intent] = journal.pending()
    return intent, restore


def test_the_intent_names_the_sandbox_and_every_container_before_anything_is_made(journal):
    with prj.track(journal, "/ckpt/web", 2) as restore:
        [intent] = journal.pending()
        assert intent.operation == Operation.RESTORE_POD and intent.target == restore.sandbox_id
        assert intent.step == prj.STEP_BEGIN and intent.facts[prj.FACT_CHECKPOINT] == "/ckpt/web"
        named = prj.InterruptedPodRestore.from_intent(intent).container_ids
        assert (restore.next_container_id(), restore.next_container_id()) == named
        assert len({restore.sandbox_id, *named}) == 3
    assert journal.pending() == [], "a RestorePod that answered leaves no intent"


def test_a_failed_call_that_undid_everything_closes_its_intent(journal):
    containers, sandboxes = FakeContainers({}), FakeSandboxes(set())
    with pytest.raises(FailedPrecondition):
        with prj.track(journal, "/ckpt/web", 1) as restore:
            sandboxes.ids.add(restore.sandbox_id)
            containers.records[restore.next_container_id()] = restore.sandbox_id
            try:
                raise FailedPrecondition("image mismatch")
            except BaseException:
                restore.undo(containers, sandboxes)
                raise
    assert containers.records == {} and sandboxes.ids == set()
    assert journal.pending() == []


def test_a_failed_call_whose_undo_left_something_keeps_its_intent_for_the_next_start(journal):
    containers, sandboxes = FakeContainers({}), FakeSandboxes(set(), fail=True)
    with pytest.raises(FailedPrecondition, match="image mismatch"):
        with prj.track(journal, "/ckpt/web", 1) as restore:
            sandboxes.ids.add(restore.sandbox_id)
            try:
                raise FailedPrecondition("image mismatch")
            except BaseException:
                restore.undo(containers, sandboxes)
                raise
    assert restore.left and "sandbox" in restore.left[0]
    assert [i.target for i in journal.pending()] == [restore.sandbox_id]


def test_recovery_removes_the_containers_then_the_sandbox_and_closes_the_intent(journal):
    intent, restore = open_restore(journal)
    first, second = restore.container_ids
    calls: list = []
    # The second container's record was saved after its id was journaled; a third container sits in
    # the sandbox without being named (none should, but the sandbox cannot go while it is there).
    containers = FakeContainers({first: restore.sandbox_id, second: restore.sandbox_id, "other": restore.sandbox_id,
                                 "unrelated": "another-pod"})
    containers.calls = calls
    sandboxes = FakeSandboxes({restore.sandbox_id, "another-pod"}, calls=calls)
    prj.recover(journal, journal.pending(), containers, sandboxes)
    assert calls == [("remove", first), ("remove", second), ("remove", "other"),
                     ("stop", restore.sandbox_id), ("remove_pod", restore.sandbox_id)]
    assert containers.records == {"unrelated": "another-pod"} and sandboxes.ids == {"another-pod"}
    assert journal.pending() == []


def test_recovery_when_the_call_was_killed_before_its_sandbox_was_saved(journal):
    # Killed while the sandbox was being made (RunPodSandbox's own recovery undid it): the containers
    # were named but never made; nothing to remove.
    intent, restore = open_restore(journal, containers=2)
    containers, sandboxes = FakeContainers({}), FakeSandboxes(set())
    prj.recover(journal, journal.pending(), containers, sandboxes)
    assert containers.calls == [] and sandboxes.calls == []
    assert journal.pending() == []


def test_recovery_clears_a_container_killed_between_its_directory_and_its_record(journal):
    intent, restore = open_restore(journal, containers=2)
    first, second = restore.container_ids
    containers = FakeContainers({first: restore.sandbox_id}, dirs={second})
    sandboxes = FakeSandboxes({restore.sandbox_id})
    prj.recover(journal, journal.pending(), containers, sandboxes)
    assert containers.calls == [("remove", first), ("leftovers", second)]
    assert sandboxes.ids == set() and journal.pending() == []


def test_recovery_that_cannot_remove_everything_keeps_the_intent_and_leaves_other_intents(journal):
    intent, restore = open_restore(journal, containers=1)
    other = journal.begin(Operation.CHECKPOINT_POD, "some-pod", step="freezing")
    [cid] = restore.container_ids
    containers = FakeContainers({cid: restore.sandbox_id}, fail={cid})
    sandboxes = FakeSandboxes({restore.sandbox_id})
    prj.recover(journal, journal.pending(), containers, sandboxes)
    # The rest is still tried, and the intent stays for the next start.
    assert ("stop", restore.sandbox_id) in sandboxes.calls
    assert sorted(i.id for i in journal.pending()) == sorted([intent.id, other.id])
    containers.fail.clear()
    prj.recover(journal, journal.pending(), containers, sandboxes)
    assert [i.id for i in journal.pending()] == [other.id], "the next start finishes the repair"
    assert containers.records == {} and sandboxes.ids == set()
