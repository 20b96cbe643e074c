"""Lazy checkpoints' decisions (the real flow with CRIU: integration/test_migrate_lazy.py)."""
from __future__ import annotations

import pytest

from pyshim.checkpoint_restore import lazy_checkpoint
from pyshim.errors import InvalidArgument


def test_page_server_metadata_must_be_numeric_address_and_port():
    assert str(lazy_checkpoint.parse_page_server("10.0.0.2:27001")) == "10.0.0.2:27001"
    for bad in ("somehost:27001", "10.0.0.2", "10.0.0.2:70000"):
        with pytest.raises(InvalidArgument, match="ADDRESS:PORT"):
            lazy_checkpoint.parse_page_server(bad)


def test_crius_verdict_is_read_from_its_log(tmp_path):
    log = tmp_path / "dump.log"
    assert not lazy_checkpoint._served(log)  # no log: not served
    log.write_bytes(b"(00.2) Starting lazy pages server\n(05.0) Lazy pages transfer FAILED\n")
    assert not lazy_checkpoint._served(log)
    log.write_bytes(b"(00.2) Starting lazy pages server\n(05.0) Lazy pages transfer finished successfully\n")
    assert lazy_checkpoint._served(log)


def test_a_dead_or_foreign_pid_is_not_our_runc():
    import os

    assert not lazy_checkpoint._criu_alive(0, 0)
    assert not lazy_checkpoint._criu_alive(os.getpid(), 0)  # alive, but not a runc checkpoint --lazy-pages
