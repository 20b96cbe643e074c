"""The pure parts of `pyshim migrate --lazy`: the page server option, its journal, --status without a target."""
from __future__ import annotations

import pytest

from criu_glue.lazy_pages import PageServer
from pyshim.migration import lazy_move
from pyshim.migration.journal import Phase
from pyshim.migration.workload import MoveError


def test_page_server_option_takes_an_address_and_maybe_a_port():
    assert lazy_move.page_server_address("10.97.3.2:27100") == PageServer("10.97.3.2", 27100)
    picked = lazy_move.page_server_address("10.97.3.2")
    assert picked.address == "10.97.3.2"
    assert lazy_move.PAGE_SERVER_PORTS[0] <= picked.port <= lazy_move.PAGE_SERVER_PORTS[1]
    assert lazy_move.page_server_address("fd00::2").address == "fd00::2"
    for bad in ("node-a", "node-a:27000", "10.97.3.2:0", ""):
        with pytest.raises(MoveError, match="--page-server"):
            lazy_move.page_server_address(bad)


def test_lazy_journal_has_its_own_file_and_keeps_the_page_server(tmp_path):
    journal = lazy_move.open_lazy_journal(tmp_path, "unix:///a", "unix:///b", "c1")
    assert journal.path.endswith("c1.lazy.json")
    journal.advance(Phase.CHECKPOINTING, page_server="10.0.0.2:27001", frozen_at=12.5)
    again = lazy_move.open_lazy_journal(tmp_path, "unix:///a", "unix:///b", "c1")
    assert (again.phase, again.page_server, again.frozen_at) == (Phase.CHECKPOINTING, "10.0.0.2:27001", 12.5)
    with pytest.raises(MoveError, match="unfinished move"):
        lazy_move.open_lazy_journal(tmp_path, "unix:///a", "unix:///other", "c1")


def test_status_reads_the_journal_and_says_when_there_is_none(tmp_path):
    with pytest.raises(MoveError, match="no move of c1 is in flight"):
        lazy_move.status_of(tmp_path, "c1")
    journal = lazy_move.open_lazy_journal(tmp_path, "unix:///a", "unix:///b", "c1")
    journal.advance(Phase.CHECKPOINTED, page_server="10.0.0.2:27001")
    status = lazy_move.status_of(tmp_path, "c1")
    assert status["phase"] == "checkpointed" and status["lazy"] and status["page_server"] == "10.0.0.2:27001"
