"""Lazy restore's decisions and its durable record (the daemon itself: integration/test_lazy_restore.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pyshim.annotations import RESTORE_LAZY_ANNOTATION as LAZY
from pyshim.errors import InvalidArgument
from pyshim.checkpoint_restore.lazy_restore import LazyChoice, LazyState, LazyTransfer, lazy_choice


def test_choice_follows_annotation_then_default():
    assert lazy_choice({}, False).lazy is False
    assert lazy_choice({}, True).lazy is True
    assert lazy_choice({LAZY: "false"}, True).lazy is False
    assert lazy_choice({LAZY: "true"}, False) == LazyChoice(True, None)  # pages from the local images


@pytest.mark.parametrize("value", ["yes", "True", "1", " true"])
def test_choice_refuses_bad_values(value):
    with pytest.raises(InvalidArgument) as err:
        lazy_choice({LAZY: value}, False)
    assert LAZY in err.value.message


def test_transfer_record_round_trips(tmp_path: Path):
    t = LazyTransfer(container_id="c1", work_dir=str(tmp_path), images_dir=str(tmp_path / "checkpoint"),
                     page_server="10.1.2.3:27000", pid=42, pid_start_ns=7, started_at_ns=1,
                     restored_at_ns=1_000_000, finished_at_ns=251_000_000, total_bytes=10, copied_bytes=10,
                     state=LazyState.COMPLETE)
    t.save()
    back = LazyTransfer.load(tmp_path)
    assert back == t
    status = back.as_status()
    assert status["lazyPages"] == "complete" and status["lazyPagesMs"] == 250.0
    assert status["lazyPagesSource"] == "10.1.2.3:27000"


def test_no_record_and_damaged_record(tmp_path: Path):
    assert LazyTransfer.load(tmp_path) is None
    (tmp_path / "lazy-pages.json").write_text("{not json")
    damaged = LazyTransfer.load(tmp_path)
    assert damaged is not None and damaged.state == LazyState.TRANSFERRING  # recovery judges it by its log


def test_page_server_annotation_makes_the_restore_lazy_from_the_source():
    from criu_glue.lazy_pages import PageServer
    from pyshim.annotations import RESTORE_LAZY_PAGE_SERVER_ANNOTATION as SERVER

    assert lazy_choice({SERVER: "10.97.1.2:27027"}, False) == LazyChoice(True, PageServer("10.97.1.2", 27027))
    assert lazy_choice({SERVER: "[fd00::2]:80", LAZY: "true"}, False).page_server == PageServer("fd00::2", 80)
    for bad in ("node-a:27027", "10.97.1.2", "10.97.1.2:0", "10.97.1.2:99999", "1.2.3.4:22; rm -rf /"):
        with pytest.raises(InvalidArgument, match=SERVER):
            lazy_choice({SERVER: bad}, False)
    with pytest.raises(InvalidArgument, match="drop one"):
        lazy_choice({SERVER: "10.97.1.2:27027", LAZY: "false"}, False)


def _progress(total: int, copied: int, errors=()):
    from criu_glue.lazy_pages import LazyProgress
    return LazyProgress(total_bytes=total, copied_bytes=copied, processes={1, 7}, finished={1, 7},
                        errors=list(errors))


def test_outcome_every_page_copied_is_complete():
    from pyshim.checkpoint_restore.lazy_restore import judge_outcome
    assert judge_outcome(0, _progress(8192, 8192), lambda: False) == LazyState.COMPLETE


def test_outcome_a_child_that_exited_before_its_pages_came_is_still_complete():
    """CI saw this: a shell's `sleep` child ended before its last page was copied; CRIU exits 0 and
    the container runs on with every page it can touch."""
    from pyshim.checkpoint_restore.lazy_restore import judge_outcome
    assert judge_outcome(0, _progress(8200192, 8196096), lambda: True) == LazyState.COMPLETE
    assert judge_outcome(0, _progress(8200192, 8196096), lambda: False) == LazyState.ENDED


def test_outcome_a_failed_daemon_is_failed_whatever_was_copied():
    from pyshim.checkpoint_restore.lazy_restore import judge_outcome
    asked = []
    assert judge_outcome(1, _progress(8192, 8192), lambda: asked.append(1) or True) == LazyState.FAILED
    assert judge_outcome(-9, _progress(8192, 4096), lambda: True) == LazyState.FAILED
    assert not asked  # a failure never needs the container's state to be judged


def test_outcome_of_an_adopted_daemon_comes_from_its_log():
    from pyshim.checkpoint_restore.lazy_restore import judge_outcome
    assert judge_outcome(None, _progress(8192, 8192), lambda: True) == LazyState.COMPLETE
    assert judge_outcome(None, _progress(8192, 8192, ["Error (uffd.c:1): boom"]), lambda: True) == LazyState.FAILED


def _fake_criu(tmp_path: Path, body: str) -> str:
    """A stand-in for `criu lazy-pages`: a Python script; `status_fd` is the --status-fd number."""
    script = tmp_path / "criu"
    script.write_text(f"#!{sys.executable}\nimport os, sys, time\n"
                      "status_fd = int(sys.argv[sys.argv.index('--status-fd') + 1])\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def _restores(tmp_path: Path, criu: str):
    from pyshim.checkpoint_restore.lazy_restore import LazyRestores

    work = tmp_path / "containers" / "c1"
    (work / "checkpoint").mkdir(parents=True)
    return LazyRestores(tmp_path / "containers", criu=criu, ready_timeout=5), work


def test_a_launched_daemon_is_waited_for_only_when_needed(tmp_path: Path):
    ready_late = "time.sleep(0.2); os.write(status_fd, bytes(1)); time.sleep(30)"
    restores, work = _restores(tmp_path, _fake_criu(tmp_path, ready_late))
    restores.launch("c1", work, work / "checkpoint")
    record = LazyTransfer.load(work)
    assert record.pid and record.state == LazyState.TRANSFERRING  # written down before it is ready
    restores.wait_ready("c1")
    assert restores.status("c1", work)["lazyPages"] == "transferring"
    restores.abort("c1")  # the restore failed after all: the daemon is killed and reaped
    assert not Path(f"/proc/{record.pid}").exists()


def test_a_daemon_that_exits_before_listening_fails_the_wait_and_is_forgotten(tmp_path: Path):
    from criu_glue.lazy_pages import LazyPagesError

    fails = "open('lazy-pages.log', 'w').write('Error (criu/uffd.c:1): no uffd\\n'); sys.exit(1)"
    restores, work = _restores(tmp_path, _fake_criu(tmp_path, fails))
    restores.launch("c1", work, work / "checkpoint")
    with pytest.raises(LazyPagesError, match="no uffd"):
        restores.wait_ready("c1")
    assert restores.wait("c1", 0)  # nothing watched any more
    assert (work / "lazy-pages.log").exists()  # kept: it explains the failure


def test_a_daemon_abandoned_before_it_listens_is_killed(tmp_path: Path):
    restores, work = _restores(tmp_path, _fake_criu(tmp_path, "time.sleep(30)"))
    restores.launch("c1", work, work / "checkpoint")
    pid = LazyTransfer.load(work).pid
    restores.abort("c1")
    assert not Path(f"/proc/{pid}").exists()
