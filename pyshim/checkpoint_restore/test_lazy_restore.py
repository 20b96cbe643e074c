"""Lazy restore's decisions and its durable record (the daemon itself: integration/test_lazy_restore.py)."""
from __future__ import annotations

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
