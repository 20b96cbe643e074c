"""pyshim's gRPC metadata on CheckpointContainer: what a move asks for, and a clear refusal of the rest."""
import pytest

from pyshim.annotations import CHECKPOINT_ARCHIVE_KEY, CHECKPOINT_MODE_KEY
from pyshim.errors import InvalidArgument
from pyshim.server.container_checkpoint import _durable_requested, _stop_requested


def test_archives_are_durable_unless_a_move_says_throwaway():
    assert _durable_requested({}) is True
    assert _durable_requested({CHECKPOINT_ARCHIVE_KEY: "durable"}) is True
    assert _durable_requested({CHECKPOINT_ARCHIVE_KEY: "throwaway", CHECKPOINT_MODE_KEY: "stop"}) is False
    assert _stop_requested({CHECKPOINT_MODE_KEY: "stop"}) is True


def test_an_unknown_archive_kind_is_invalid_and_named():
    with pytest.raises(InvalidArgument, match="pyshim-checkpoint-archive='fast'"):
        _durable_requested({CHECKPOINT_ARCHIVE_KEY: "fast"})


def test_the_archive_digest_is_kept_in_the_record_and_shown_in_last_checkpoint():
    from criu_glue.archive import ArchiveDigest
    from pyshim.checkpoint_restore.records import CheckpointFacts

    written = ArchiveDigest("sha256:" + "a" * 64, "sha256:" + "a" * 64, 4096)
    facts = CheckpointFacts(location="/tmp/x.tar", time_ns=1, archive_bytes=4096, stopped=True, archive=written)
    again = CheckpointFacts.from_doc(facts.to_doc())
    assert again == facts
    assert ArchiveDigest.from_json(again.figures()["archive"]) == written
    assert "archive" not in CheckpointFacts(location="/tmp/y.tar", time_ns=1).figures()  # none known: none shown


def test_lazy_modes_are_for_checkpoint_container_only():
    from pyshim.server.container_checkpoint import _checkpoint_mode

    assert _checkpoint_mode({CHECKPOINT_MODE_KEY: "lazy"}) == "lazy"
    assert _checkpoint_mode({}) == "leave-running"
    with pytest.raises(InvalidArgument, match="CheckpointContainer only"):
        _stop_requested({CHECKPOINT_MODE_KEY: "lazy-finish"})  # CheckpointPod's reading of the mode
