"""The pod calls' deadline rule and their binding on the servicer (the engines have their own tests)."""
import pytest

from pyshim.errors import InvalidArgument
from pyshim.server import servicer
from pyshim.server.pod_checkpoint import NO_DEADLINE_SECONDS, caller_deadline


def test_a_call_without_deadline_is_refused():
    for remaining in (None, NO_DEADLINE_SECONDS + 1, 2**62):
        with pytest.raises(InvalidArgument, match="no deadline"):
            caller_deadline(remaining, "CheckpointPod")


def test_a_deadline_is_kept():
    import time
    before = time.monotonic()
    deadline = caller_deadline(30, "RestorePod")
    assert before + 30 <= deadline <= time.monotonic() + 30


def test_servicer_binds_the_pod_calls():
    assert servicer.RuntimeService.CheckpointPod.__wrapped__.__name__ == "checkpoint_pod"
    assert servicer.RuntimeService.RestorePod.__wrapped__.__name__ == "restore_pod"
