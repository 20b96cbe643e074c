"""The restore engine's start-up repair of a StartContainer killed mid-restore, with a fake runc."""
from pyshim.checkpoint_restore.restore import RestoreEngine
from pyshim.internal.intents import Operation
from pyshim.internal.state import ContainerState
from pyshim.internal.test_container_recovery import _manager, _record


def test_an_interrupted_restore_with_no_monitor_is_reset_for_a_clean_retry(tmp_path):
    manager, runc, journal = _manager(tmp_path)
    engine = RestoreEngine(manager, restorer=None, runc=runc, conmon=None, images=None, puller=None,
                           intents=journal)
    record = _record(manager, "r1", ContainerState.CREATED, restore_from="/ckpt.tar")
    images = record.bundle / "checkpoint"
    images.mkdir()
    (images / "pages-1.img").write_text("x")
    (record.upper / "from-the-diff").write_text("x")
    runc.add("r1", "running", pid=999999)  # restored, but its conmon is gone: no monitor, no log
    journal.begin(Operation.RESTORE_CONTAINER, "r1", step="runc_restore", images_dir=str(images))
    # The daemon's order (pyshim/internal/recovery.py): restores first, then the container records.
    engine.recover(journal.pending())
    manager.recover(journal.pending())
    assert record.state == ContainerState.CREATED and record.pending_restore
    assert not images.exists() and list(record.upper.iterdir()) == []
    assert ("kill", "r1", "KILL") in runc.calls and ("delete", "r1") in runc.calls
    assert journal.pending() == []
