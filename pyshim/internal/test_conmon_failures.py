"""conmon.create that never reports: nothing it started may live on, and it ran in the bundle."""
import os
import time
from pathlib import Path

import pytest

from pyshim.internal.conmon import Conmon, MonitorPaths
from pyshim.internal.runc import RuncError

# Stands in for conmon: records its cwd, forks a "monitor" that starts a busy child (as runc init
# would be) and writes the monitor's pid to the -P file, then the first process exits; nobody ever
# writes to the sync pipe.
FAKE_CONMON = """#!/bin/sh
pwd > "$CWD_NOTE"
while [ $# -gt 0 ]; do [ "$1" = -P ] && pidfile=$2; shift; done
sh -c 'sleep 600 & echo $! > "$CHILD_NOTE"; echo $$ > "$0"; exec sleep 601' "$pidfile" &
exit 0
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_conmon_that_never_reports_is_killed_with_everything_it_started(tmp_path, monkeypatch):
    fake = tmp_path / "conmon"
    fake.write_text(FAKE_CONMON)
    fake.chmod(0o755)
    monkeypatch.setenv("CWD_NOTE", str(tmp_path / "cwd"))
    monkeypatch.setenv("CHILD_NOTE", str(tmp_path / "child"))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    paths = MonitorPaths(bundle, tmp_path / "exits", tmp_path / "persist", tmp_path / "attach")
    with pytest.raises(RuncError, match="did not report"):
        Conmon(str(fake), "runc", tmp_path / "runc").create("c1", "c1", paths, "", timeout=1.5)
    assert (tmp_path / "cwd").read_text().strip() == str(bundle)
    monitor = int(paths.conmon_pidfile.read_text())
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 10
    while _alive(monitor) or _alive(child):
        assert time.monotonic() < deadline, "the fake monitor or its child survived"
        time.sleep(0.05)
