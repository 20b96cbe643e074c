"""RestorePod's early unpack of the parts: handed over whole, used once and only for the same file,
nothing left on failure or after a killed daemon."""
import os
import time

import pytest

from criu_glue.limits import Limits
from pyshim.checkpoint_restore import pod_unpack
from pyshim.checkpoint_restore.pod_unpack import PREPARED_DIR, PREPARED_MARK, PodUnpacks
from pyshim.checkpoint_restore.test_restore import _archive
from pyshim.internal.intents import IntentJournal, Operation


def _unpacks(tmp_path):
    journal = IntentJournal(tmp_path / "intents")
    return PodUnpacks(tmp_path / "work", journal, lambda _dir: Limits()), journal


def _bundles(tmp_path, n):
    bundles = [tmp_path / f"c{i}" for i in range(n)]
    for b in bundles:
        b.mkdir()
    return bundles


def test_parts_are_handed_to_their_containers_and_taken_once(tmp_path):
    unpacks, journal = _unpacks(tmp_path)
    parts = [_archive(tmp_path / "0.tar"), _archive(tmp_path / "1.tar")]
    unpack = unpacks.start("pod", parts)
    assert [i.operation for i in journal.pending()] == [Operation.UNPACK_POD_PARTS], "not announced first"
    bundles = _bundles(tmp_path, 2)
    assert unpack.hand_over(bundles) == 2
    assert journal.pending() == [] and list((tmp_path / "work").iterdir()) == []
    for part, bundle in zip(parts, bundles):
        assert (bundle / PREPARED_DIR / "inventory.img").read_bytes() == b"\0" * 8
        prepared = pod_unpack.take_prepared(bundle, part, os.stat(part))
        assert prepared is not None and prepared.path == bundle / PREPARED_DIR and prepared.image_bytes == 8
        assert not (bundle / PREPARED_MARK).exists(), "the mark must be consumed"
        assert pod_unpack.take_prepared(bundle, part, os.stat(part)) is None, "a tree must be used once"


def test_a_part_changed_since_restorepod_is_not_used(tmp_path):
    unpacks, _ = _unpacks(tmp_path)
    part = _archive(tmp_path / "0.tar")
    [bundle] = _bundles(tmp_path, 1)
    unpacks.start("pod", [part]).hand_over([bundle])
    time.sleep(0.01)
    _archive(tmp_path / "other.tar", config_extra={"name": "other"}).rename(part)  # another file, same path
    assert pod_unpack.take_prepared(bundle, part, os.stat(part)) is None
    assert not (bundle / PREPARED_DIR).exists(), "the stale tree must be removed"


def test_a_tree_without_its_mark_is_never_used(tmp_path):
    part = _archive(tmp_path / "0.tar")
    [bundle] = _bundles(tmp_path, 1)
    (bundle / PREPARED_DIR).mkdir()  # e.g. killed between the rename and the mark
    assert pod_unpack.take_prepared(bundle, part, os.stat(part)) is None
    assert not (bundle / PREPARED_DIR).exists()


def test_a_part_that_cannot_be_unpacked_is_left_to_startcontainer(tmp_path):
    unpacks, journal = _unpacks(tmp_path)
    good, bad = _archive(tmp_path / "0.tar"), tmp_path / "1.tar"
    bad.write_bytes(b"not a tar")
    bundles = _bundles(tmp_path, 2)
    assert unpacks.start("pod", [good, bad]).hand_over(bundles) == 1
    assert (bundles[0] / PREPARED_MARK).exists() and not (bundles[1] / PREPARED_DIR).exists()
    assert journal.pending() == [] and list((tmp_path / "work").iterdir()) == []


def test_a_failed_restorepod_discards_everything(tmp_path):
    unpacks, journal = _unpacks(tmp_path)
    unpacks.start("pod", [_archive(tmp_path / "0.tar")]).discard()
    assert journal.pending() == [] and list((tmp_path / "work").iterdir()) == []


def test_recovery_removes_what_a_killed_restorepod_was_unpacking(tmp_path):
    unpacks, journal = _unpacks(tmp_path)
    work = tmp_path / "work" / "123"
    (work / "0").mkdir(parents=True)
    (work / "0" / "pages-1.img").write_bytes(b"half")
    journal.begin(Operation.UNPACK_POD_PARTS, "pod", step="unpack", work_dir=str(work))
    outside = tmp_path / "not-ours"
    outside.mkdir()
    journal.begin(Operation.UNPACK_POD_PARTS, "pod", step="unpack", work_dir=str(outside))
    unpacks.recover(journal.pending())
    assert not work.exists() and journal.pending() == []
    assert outside.exists(), "recovery removed a directory outside its work root"


def test_parts_not_unpacked_before_the_deadline_are_left_to_startcontainer_and_cleaned_up(tmp_path, monkeypatch):
    import threading
    from criu_glue.archive import CheckpointArchive
    release = threading.Event()
    real = CheckpointArchive.extract_checkpoint_images

    def slow_for_part_1(self, dest, limits):
        if dest.name == "1":
            release.wait(30)
        return real(self, dest, limits)
    monkeypatch.setattr(CheckpointArchive, "extract_checkpoint_images", slow_for_part_1)
    unpacks, journal = _unpacks(tmp_path)
    unpack = unpacks.start("pod", [_archive(tmp_path / "0.tar"), _archive(tmp_path / "1.tar")])
    bundles = _bundles(tmp_path, 2)
    deadline = time.monotonic() + 60
    while not unpack._parts[0].done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert unpack.hand_over(bundles, until=time.monotonic()) == 1  # part 1 still unpacking: given up
    assert (bundles[0] / PREPARED_MARK).exists() and not (bundles[1] / PREPARED_DIR).exists()
    assert journal.pending(), "closed while an unpack still writes into the work directory"
    unpack.discard()  # RestorePod then failing (e.g. its deadline): must not wait for the unpack again
    assert journal.pending(), "discard waited for an unpack it had given up on"
    release.set()
    while journal.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert journal.pending() == [] and list((tmp_path / "work").iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a thread's priority again needs CAP_SYS_NICE")
def test_unpacks_run_at_the_lowest_priority_until_restorepod_waits_for_them(tmp_path, monkeypatch):
    import threading
    from criu_glue.archive import CheckpointArchive
    started, release, seen = threading.Event(), threading.Event(), {}
    real = CheckpointArchive.extract_checkpoint_images

    def observed(self, dest, limits):
        seen["background"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        started.set()
        release.wait(30)
        seen["waited_for"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return real(self, dest, limits)
    monkeypatch.setattr(CheckpointArchive, "extract_checkpoint_images", observed)
    set_nice = pod_unpack._set_nice

    def set_then_release(tid, nice):
        set_nice(tid, nice)
        if nice == 0:
            release.set()  # the unpack goes on once RestorePod has raised its priority again
    monkeypatch.setattr(pod_unpack, "_set_nice", set_then_release)
    unpacks, _ = _unpacks(tmp_path)
    unpack = unpacks.start("pod", [_archive(tmp_path / "0.tar")])
    assert started.wait(30)
    assert unpack.hand_over(_bundles(tmp_path, 1)) == 1
    assert seen == {"background": pod_unpack.BACKGROUND_NICE, "waited_for": 0}
