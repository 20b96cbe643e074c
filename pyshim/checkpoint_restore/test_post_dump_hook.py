"""The post-dump hook's plumbing, with a stand-in for runc+CRIU that runs the installed script the way
CRIU does (the real pair is exercised by integration/test_checkpoint*.py and test_crash_containers.py)."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from pyshim.checkpoint_restore import post_dump_hook as hook
from pyshim.errors import DeadlineExceeded
from pyshim.internal.runc import CheckpointRequest, Runc, RuncError, RuncTimeout


class CriuStandIn(Runc):
    """`runc checkpoint` replaced by a shell that runs the action script for pre-dump and post-dump,
    as CRIU does with its configuration file's action-script, and fails when post-dump fails."""

    def __init__(self, root: Path, script: Path, before_post_dump: str = "", runs_script: bool = True,
                 after_post_dump: str = ""):
        super().__init__("runc", root)
        self.script, self.before, self.after, self.runs_script = script, before_post_dump, after_post_dump, runs_script
        self.started = 0

    def start_checkpoint(self, container_id, req):
        self.started += 1
        run = "" if not self.runs_script else (
            f'CRTOOLS_SCRIPT_ACTION=pre-dump "{self.script}" || exit 7\n'
            f'CRTOOLS_SCRIPT_ACTION=post-dump "{self.script}" || {{ echo "level=error msg=\\"post-dump failed\\"" >&2; exit 1; }}\n')
        shell = f'export CRTOOLS_IMAGE_DIR="{req.image_path}"\n{self.before}\n{run}\n{self.after}'
        return subprocess.Popen(["sh", "-c", shell], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)


@pytest.fixture
def setup(tmp_path):
    installed = hook.PostDumpHook(tmp_path / "root")
    assert installed.usable, installed.reason
    work = tmp_path / "work"
    (work / "checkpoint").mkdir(parents=True)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    req = CheckpointRequest(work / "checkpoint", work)
    return installed, req, hook.criu_config_path(bundle), tmp_path


def test_the_installed_script_is_executable_and_does_nothing_outside_a_checkpoint(tmp_path):
    installed = hook.PostDumpHook(tmp_path / "root")
    assert installed.usable and os.access(installed.script, os.X_OK)
    work = tmp_path / "work"
    (work / "checkpoint").mkdir(parents=True)
    for action in ("post-dump", "pre-dump", "network-lock"):
        env = {"CRTOOLS_SCRIPT_ACTION": action, "CRTOOLS_IMAGE_DIR": str(work / "checkpoint"), "PATH": "/usr/bin:/bin"}
        assert subprocess.run([str(installed.script)], env=env).returncode == 0


def test_a_container_uses_the_hook_only_when_its_config_json_names_its_own_file(setup, tmp_path):
    installed, _, _, _ = setup
    bundle = tmp_path / "b2"
    bundle.mkdir()
    assert installed.config_for(bundle) is None  # no config.json
    (bundle / "config.json").write_text(json.dumps({"annotations": {"other": "x"}}))
    assert installed.config_for(bundle) is None  # made before pyshim named it: pause first
    (bundle / "config.json").write_text(json.dumps({"annotations": {hook.CRIU_CONFIG_ANNOTATION: "/etc/x.conf"}}))
    assert installed.config_for(bundle) is None
    (bundle / "config.json").write_text(json.dumps({"annotations": hook.spec_annotation(bundle)}))
    assert installed.config_for(bundle) == bundle / "criu.conf"
    installed.usable = False
    assert installed.config_for(bundle) is None


def test_the_diff_runs_while_criu_waits_and_the_config_file_is_put_back(setup):
    installed, req, config, tmp_path = setup
    marker = tmp_path / "criu-went-on"
    runc = CriuStandIn(tmp_path / "runc", installed.script, after_post_dump=f'touch "{marker}"')
    seen = {}

    def diff():
        seen["config"] = config.read_text()
        seen["criu_went_on"] = marker.exists()
        return ["deleted"]
    measured, value = installed.dump(runc, "c1", req, config, time.monotonic() + 30, diff)
    assert value == ["deleted"] and seen["criu_went_on"] is False and marker.exists()
    assert seen["config"] == f"action-script {installed.script}\n"
    assert not config.exists()  # absent before, absent after
    assert not (req.work_path / hook.REQUEST_LINK).is_symlink() and not (req.work_path / hook.ANSWER_LINK).is_symlink()
    # No stats-dump from the stand-in: the frozen time is runc's whole run, an upper bound.
    assert measured.frozen_measured == "runc checkpoint" and measured.hook_wait_ms > 0


def test_a_restored_containers_tcp_close_survives_a_checkpoint(setup):
    installed, req, config, tmp_path = setup
    config.write_text("tcp-close\n")
    seen = []
    installed.dump(CriuStandIn(tmp_path / "runc", installed.script), "c1", req, config, time.monotonic() + 30,
                   lambda: seen.append(config.read_text()))
    assert seen == [f"tcp-close\naction-script {installed.script}\n"]
    assert config.read_text() == "tcp-close\n"


def test_a_failing_diff_fails_criu_and_is_the_error_raised(setup):
    installed, req, config, tmp_path = setup

    def diff():
        raise DeadlineExceeded("too late for the diff")
    with pytest.raises(DeadlineExceeded, match="too late"):
        installed.dump(CriuStandIn(tmp_path / "runc", installed.script), "c1", req, config,
                       time.monotonic() + 30, diff)
    assert not config.exists()


def test_a_criu_that_never_runs_the_script_is_reported(setup):
    installed, req, config, tmp_path = setup
    runc = CriuStandIn(tmp_path / "runc", installed.script, runs_script=False)
    with pytest.raises(hook.HookNotRun):
        installed.dump(runc, "c1", req, config, time.monotonic() + 30, lambda: pytest.fail("no diff expected"))


def test_a_runc_failure_before_post_dump_is_runcs_error(setup):
    installed, req, config, tmp_path = setup
    runc = CriuStandIn(tmp_path / "runc", installed.script, before_post_dump='echo "level=error msg=\\"criu failed\\"" >&2; exit 1')
    with pytest.raises(RuncError, match="criu failed"):
        installed.dump(runc, "c1", req, config, time.monotonic() + 30, lambda: pytest.fail("no diff expected"))


def test_the_deadline_stops_runc(setup):
    installed, req, config, tmp_path = setup
    runc = CriuStandIn(tmp_path / "runc", installed.script, before_post_dump="sleep 30")
    with pytest.raises(RuncTimeout):
        installed.dump(runc, "c1", req, config, time.monotonic() + 0.5, lambda: pytest.fail("no diff expected"))
    assert not config.exists()


def test_the_script_fails_when_the_daemon_end_is_gone(setup):
    """A daemon killed while the script waits: its pipe ends close, the script reads EOF and fails
    (CRIU then thaws the tasks). Here the channel is closed under a waiting script."""
    installed, req, _, _ = setup
    env = {"CRTOOLS_SCRIPT_ACTION": "post-dump", "CRTOOLS_IMAGE_DIR": str(req.image_path), "PATH": "/usr/bin:/bin"}
    channel = hook._Channel(req.work_path).__enter__()
    script = subprocess.Popen([str(installed.script)], env=env)
    assert os.read(channel.request_r, 64) == b"post-dump\n"
    # What the kernel does to a killed daemon's fds (the links stay, pointing nowhere).
    for fd in channel._fds:
        os.close(fd)
    channel._fds = []
    assert script.wait(timeout=10) != 0
    channel.__exit__(None, None, None)
    # A daemon gone before the script opened the links: /proc/<pid>/fd/<n> no longer exists.
    (req.work_path / hook.ANSWER_LINK).symlink_to("/proc/self/fd/987654")
    (req.work_path / hook.REQUEST_LINK).symlink_to("/proc/self/fd/987655")
    assert subprocess.run([str(installed.script)], env=env, capture_output=True).returncode != 0


def test_recovery_takes_our_line_out_of_a_config_file(tmp_path):
    config = tmp_path / "criu.conf"
    config.write_text("tcp-close\naction-script /var/lib/pyshim/criu-post-dump-hook\n")
    assert hook.remove_from_config(config) and config.read_text() == "tcp-close\n"
    assert not hook.remove_from_config(config)
    config.write_text("action-script /var/lib/pyshim/criu-post-dump-hook\n")
    assert hook.remove_from_config(config) and not config.exists()
    assert not hook.remove_from_config(tmp_path / "missing.conf")


class RecordingRunc:
    def __init__(self):
        self.calls = []

    def pause(self, container_id):
        self.calls.append("pause")

    def resume(self, container_id):
        self.calls.append("resume")

    def checkpoint(self, container_id, req, timeout):
        self.calls.append("checkpoint")


def test_a_criu_that_runs_no_hook_makes_the_checkpointer_pause_first(tmp_path, monkeypatch):
    """The images CRIU made without calling the hook are of another instant than any diff: they are
    dropped and the container is checkpointed again, paused first, as all later ones are."""
    from types import SimpleNamespace

    from pyshim.checkpoint_restore import checkpoint as cp
    from pyshim.config import CheckpointSettings
    from pyshim.internal.intents import IntentJournal
    from pyshim.internal.phases import PhaseTimer

    monkeypatch.setattr(cp, "criu_availability", lambda version: None)
    runc = RecordingRunc()
    checkpointer = cp.Checkpointer(CheckpointSettings(), runc, tmp_path / "root" / "checkpoint-work",
                                   intents=IntentJournal(tmp_path / "root" / "state" / "intents"))

    def no_hook(*args, **kwargs):
        (tmp_path / "work" / "checkpoint" / "stale.img").write_bytes(b"x")
        raise hook.HookNotRun("CRIU dumped without running the script")
    monkeypatch.setattr(checkpointer._post_dump, "dump", no_hook)
    work = tmp_path / "work"
    (work / "checkpoint").mkdir(parents=True)
    (tmp_path / "upper").mkdir()
    record = SimpleNamespace(id="c1", upper=tmp_path / "upper", cgroups_path="/no/such/cgroup")
    by, frozen, deleted = checkpointer._dump_frozen_by_criu(
        record, work, SimpleNamespace(diff_exclusions=[]), [], False, time.monotonic() + 30, PhaseTimer(),
        tmp_path / "criu.conf")
    assert by.startswith("runc pause") and runc.calls == ["pause", "checkpoint", "resume"]
    assert not (work / "checkpoint" / "stale.img").exists() and deleted == []
    assert not checkpointer._post_dump.usable and checkpointer._post_dump.config_for(tmp_path) is None
