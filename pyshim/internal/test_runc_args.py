"""runc command lines pyshim builds."""
from __future__ import annotations


def test_lazy_dump_runc_arguments():
    from pathlib import Path

    from pyshim.internal.runc import CheckpointRequest, _checkpoint_args

    args = _checkpoint_args(CheckpointRequest(Path("/i"), Path("/w"), lazy_page_server="10.0.0.2:27027", status_fd=7))
    assert args[-5:] == ["--lazy-pages", "--page-server", "10.0.0.2:27027", "--status-fd", "7"]
    assert "--leave-running" in args  # the frozen tasks keep their memory whatever CRIU concludes
    assert "--lazy-pages" not in _checkpoint_args(CheckpointRequest(Path("/i"), Path("/w")))
