import json
import signal
import subprocess
import sys

import pytest

from pyshim.internal import crashpoints
from pyshim.internal.intents import JOURNAL_VERSION, IntentJournal, Operation


def test_an_intent_is_on_disk_from_begin_until_finish(tmp_path):
    journal = IntentJournal(tmp_path)
    intent = journal.begin(Operation.CHECKPOINT_CONTAINER, "c1", work_dir="/w")
    journal.advance(intent, "frozen", archive_tmp="/a/.tmp")
    [found] = IntentJournal(tmp_path).pending()  # a new daemon reads what the old one wrote
    assert (found.operation, found.target, found.step) == (Operation.CHECKPOINT_CONTAINER, "c1", "frozen")
    assert found.facts == {"work_dir": "/w", "archive_tmp": "/a/.tmp"}
    journal.finish(intent)
    assert IntentJournal(tmp_path).pending() == []


def test_track_closes_the_intent_when_the_block_raises(tmp_path):
    journal = IntentJournal(tmp_path)
    with pytest.raises(RuntimeError):
        with journal.track(Operation.RUN_SANDBOX, "s1"):
            assert len(journal.pending()) == 1
            raise RuntimeError("undone")
    assert journal.pending() == []


def test_pending_is_oldest_first_and_skips_unreadable_files(tmp_path):
    journal = IntentJournal(tmp_path)
    first = journal.begin(Operation.CREATE_CONTAINER, "a")
    second = journal.begin(Operation.CREATE_CONTAINER, "b")
    (tmp_path / "0-garbage.json").write_text("{not json")
    (tmp_path / "1-future.json").write_text(json.dumps({**first.to_doc(), "version": JOURNAL_VERSION + 1}))
    assert [i.target for i in journal.pending()] == ["a", "b"]
    journal.finish(first)
    journal.finish(second)


def test_facts_must_be_strings(tmp_path):
    doc = IntentJournal(tmp_path).begin(Operation.PULL_IMAGE, "busybox").to_doc()
    doc["facts"] = {"n": 1}
    with pytest.raises(ValueError):
        type(IntentJournal(tmp_path).pending()[0]).from_doc(doc)


def _run_with_crash_at(spec: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={crashpoints.ENV: spec, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)


def test_a_crash_point_kills_the_process_at_the_named_step(tmp_path):
    code = ("from pyshim.internal.intents import IntentJournal, Operation\n"
            f"j = IntentJournal({str(tmp_path)!r})\n"
            "i = j.begin(Operation.RUN_SANDBOX, 's1')\n"
            "j.advance(i, 'netns', netns='x')\n"
            "print('survived')\n")
    result = _run_with_crash_at("run_sandbox:netns", code)
    assert result.returncode == -signal.SIGKILL
    assert "survived" not in result.stdout
    [left] = IntentJournal(tmp_path).pending()  # announced before the kill: recovery will see it
    assert left.step == "netns" and left.facts == {"netns": "x"}


def test_a_crash_point_can_wait_for_its_nth_hit():
    code = ("from pyshim.internal import crashpoints\n"
            "for i in range(3):\n"
            "    print(i, flush=True)\n"
            "    crashpoints.reached('p')\n")
    result = _run_with_crash_at("p#2", code)
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["0", "1"]


def test_without_the_variable_nothing_happens(monkeypatch):
    monkeypatch.delenv(crashpoints.ENV, raising=False)
    crashpoints.reached("run_sandbox:begin")
