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
