"""Take a checkpoint's writable-layer diff inside CRIU's own freeze, so that nothing is paused first.

The pause-first checkpoint (`runc pause`, `runc checkpoint`, diff, `runc resume`) keeps the container
frozen while runc starts, CRIU starts and probes the kernel, and both tear down: 50-85 ms on top of
CRIU's dump. Here the container keeps running while they start, CRIU freezes it itself, and the diff
is taken at CRIU's `post-dump` action, when the memory is dumped and the tasks are still frozen: the
files are of the same instant as the memory, and CRIU thaws the tasks right after our answer.

How it is wired (runc 1.1 and CRIU 4.2, verified by hand on this host):
- every container pyshim creates names its own CRIU configuration file, `<bundle>/criu.conf`, in the
  OCI annotation `org.criu.config`; runc hands that path to CRIU at `runc checkpoint` (libcontainer
  `handleCriuConfigurationFile`), CRIU ignores it while it does not exist, and its settings override
  the RPC ones;
- for one checkpoint the file holds `action-script <hook>`, the tiny shell script below that pyshim
  installs at start-up, and is put back as it was afterwards;
- CRIU runs the script for every action; for `post-dump` it opens two pipes of the daemon's through
  links in the CRIU work directory (`/proc/<daemon pid>/fd/<n>`), writes the request and waits for the
  answer. The daemon takes the diff and answers `ok`, or `fail`, on which CRIU fails the dump and
  thaws the tasks. The daemon holds the only write end of the answer pipe: killed, it closes it, the
  script reads EOF and fails, and CRIU thaws the tasks; a daemon dead before the script runs leaves
  no /proc entry to open, with the same end. Outside a checkpoint of pyshim's (no links in the work
  directory: a pod checkpoint's `runc checkpoint`, a stale file after a crash) the script does nothing.

A stopping checkpoint (a move) keeps the pause-first path: its container stays frozen until the
archive is written anyway, which dwarfs runc's start-up, and it must be thawed, not killed, if the
archive fails, which a CRIU that kills the tasks after post-dump cannot do.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from criu_glue import archive_format as fmt
from criu_glue.criu import read_dump_stats
from pyshim.internal import crashpoints
from pyshim.internal.runc import CheckpointRequest, Runc, RuncError

log = logging.getLogger(__name__)

# The OCI annotation runc reads the CRIU configuration file's path from (restore uses it for tcp-close).
CRIU_CONFIG_ANNOTATION = "org.criu.config"
# Each container's own CRIU configuration file, in its bundle (named in the annotation at create).
CRIU_CONFIG_NAME = "criu.conf"
HOOK_NAME = "criu-post-dump-hook"
# The links the script opens, in the CRIU work directory (the parent of the images directory).
REQUEST_LINK = "post-dump-request"
ANSWER_LINK = "post-dump-answer"
# Crash point (tests): the daemon dies while CRIU waits in the script, the tasks frozen.
CRASH_POINT = "checkpoint_container:post_dump"

# CRIU sets CRTOOLS_IMAGE_DIR to /proc/<criu>/fd/<images dir>; its parent is runc's work path.
HOOK_SCRIPT = f"""#!/bin/sh
# pyshim: answers CRIU's post-dump action of a checkpoint (pyshim/checkpoint_restore/post_dump_hook.py).
[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0
work="$CRTOOLS_IMAGE_DIR/.."
[ -L "$work/{ANSWER_LINK}" ] || exit 0
exec 3<"$work/{ANSWER_LINK}" || exit 1
echo post-dump >"$work/{REQUEST_LINK}" || exit 1
read -r answer <&3 || exit 1
[ "$answer" = ok ]
"""


class HookNotRun(RuncError):
    """CRIU dumped without running the post-dump script: the diff was not taken inside its freeze."""


@dataclass(frozen=True)
class HookedDump:
    """What a dump frozen by CRIU itself measured."""
    frozen_seconds: float  # CRIU's freezing + frozen time (its stats-dump), the hook included
    frozen_measured: str  # "criu stats" or, if CRIU wrote none, "runc checkpoint" (an upper bound)
    hook_wait_ms: float  # runc checkpoint started -> CRIU's post-dump request (the container runs)
    diff_ms: float  # the diff, inside the freeze


def criu_config_path(bundle: Path) -> Path:
    return Path(bundle) / CRIU_CONFIG_NAME


def spec_annotation(bundle: Path) -> dict[str, str]:
    """The annotation every new container's config.json carries (read by runc at create)."""
    return {CRIU_CONFIG_ANNOTATION: str(criu_config_path(bundle))}


class PostDumpHook:
    def __init__(self, directory: Path):
        """Install the script in `directory` and check that it can run; `usable` says whether it can."""
        self.script = Path(directory) / HOOK_NAME
        self.usable, self.reason = False, ""
        try:
            self._install()
            self._self_test()
            self.usable = True
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            self.reason = str(e)
            log.warning("CRIU's post-dump hook cannot be used; checkpoints pause the container first",
                        extra={"script": str(self.script), "error": self.reason})

    def _install(self) -> None:
        if any(c.isspace() for c in str(self.script)):
            raise ValueError(f"{self.script}: a CRIU configuration file cannot name a path with blanks")
        self.script.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        tmp = self.script.with_name(f".{HOOK_NAME}.tmp")
        tmp.write_text(HOOK_SCRIPT)
        tmp.chmod(0o700)
        tmp.rename(self.script)

    def _self_test(self) -> None:
        """CRIU execs the script: a root mounted noexec would fail every dump. Outside a checkpoint
        (no links in the directory) it must exit 0."""
        env = {"CRTOOLS_SCRIPT_ACTION": "post-dump", "CRTOOLS_IMAGE_DIR": str(self.script.parent / "none" / "x"),
               "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        subprocess.run([str(self.script)], env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
                       check=True)

    def config_for(self, bundle: Path) -> Path | None:
        """The container's own CRIU configuration file, if its config.json names it (containers
        created before pyshim did so, or whose runc read another file, get None: pause first)."""
        if not self.usable:
            return None
        expected = criu_config_path(bundle)
        try:
            annotations = json.loads((Path(bundle) / "config.json").read_text()).get("annotations") or {}
        except (OSError, ValueError):
            return None
        return expected if annotations.get(CRIU_CONFIG_ANNOTATION) == str(expected) else None

    def dump(self, runc: Runc, container_id: str, req: CheckpointRequest, config: Path, deadline: float,
             on_post_dump: Callable[[], object]) -> tuple[HookedDump, object]:
        """`runc checkpoint` of a running container; `on_post_dump` runs while CRIU holds it frozen
        (its result is returned; an exception fails the dump and is raised once CRIU has thawed).
        RuncTimeout past `deadline`; HookNotRun if CRIU never called the script (nothing taken)."""
        with _ActionScriptInConfig(config, self.script), _Channel(req.work_path) as channel:
            started = time.monotonic()
            proc = runc.start_checkpoint(container_id, req)
            outcome = _Outcome()
            try:
                if channel.wait_request(proc, deadline):
                    outcome.hook_wait_ms = (time.monotonic() - started) * 1000
                    channel.answer(outcome.run(on_post_dump, deadline))
            finally:
                # Whatever happened, runc is waited for (or killed at the deadline): CRIU thaws the
                # tasks when it gets our answer, the EOF of a closed channel, or dies.
                finished = runc.finish_checkpoint(proc, timeout=max(0.1, deadline - time.monotonic()))
            total = time.monotonic() - started
        if outcome.error is not None:
            raise outcome.error
        if finished.returncode != 0:
            runc.raise_checkpoint_failure(finished)
        if outcome.hook_wait_ms is None:
            raise HookNotRun(f"CRIU dumped container {container_id} without running {self.script} "
                             f"(CRIU configuration file {config})")
        return _measure(req, total, outcome), outcome.value


class _Outcome:
    def __init__(self):
        self.hook_wait_ms: float | None = None
        self.diff_ms = 0.0
        self.value: object = None
        self.error: BaseException | None = None

    def run(self, on_post_dump: Callable[[], object], deadline: float) -> bool:
        crashpoints.reached(CRASH_POINT)
        started = time.monotonic()
        try:
            self.value = on_post_dump()
            return True
        except Exception as e:  # noqa: BLE001 - any failure fails CRIU's dump; raised after the thaw
            self.error = e
            return False
        finally:
            self.diff_ms = (time.monotonic() - started) * 1000


def _measure(req: CheckpointRequest, total_seconds: float, outcome: _Outcome) -> HookedDump:
    for stats_file in (req.image_path / fmt.STATS_DUMP, req.work_path / fmt.STATS_DUMP):
        stats = read_dump_stats(stats_file) if stats_file.exists() else None
        if stats:
            frozen = (stats.freezing_time_us + stats.frozen_time_us) / 1e6
            return HookedDump(frozen, "criu stats", outcome.hook_wait_ms or 0.0, outcome.diff_ms)
    return HookedDump(total_seconds, "runc checkpoint", outcome.hook_wait_ms or 0.0, outcome.diff_ms)


class _Channel:
    """The two pipes the script talks to the daemon through, linked from the CRIU work directory.
    Ours only (close-on-exec): runc and CRIU never hold an end, so the daemon's death is an EOF."""

    def __init__(self, work: Path):
        self._work = Path(work)
        self._fds: list[int] = []

    def __enter__(self) -> "_Channel":
        self.request_r, self.request_w = os.pipe()
        self.answer_r, self.answer_w = os.pipe()
        self._fds = [self.request_r, self.request_w, self.answer_r, self.answer_w]
        pid = os.getpid()
        try:
            (self._work / REQUEST_LINK).symlink_to(f"/proc/{pid}/fd/{self.request_w}")
            (self._work / ANSWER_LINK).symlink_to(f"/proc/{pid}/fd/{self.answer_r}")
        except OSError:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for name in (REQUEST_LINK, ANSWER_LINK):
            with contextlib.suppress(OSError):
                (self._work / name).unlink()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def wait_request(self, proc: subprocess.Popen, deadline: float) -> bool:
        """Until the script asks (True), runc ends without it asking, or the deadline (False)."""
        pidfd = os.pidfd_open(proc.pid)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                ready, _, _ = select.select([self.request_r, pidfd], [], [], remaining)
                if self.request_r in ready:
                    return bool(os.read(self.request_r, 64))
                if pidfd in ready:
                    return False
        finally:
            os.close(pidfd)

    def answer(self, ok: bool) -> None:
        os.write(self.answer_w, b"ok\n" if ok else b"fail\n")


class _ActionScriptInConfig:
    """The container's CRIU configuration file with our action script added, for one checkpoint;
    put back as it was afterwards (a restored container's may hold `tcp-close`)."""

    def __init__(self, config: Path, script: Path):
        self._config, self._script = config, script
        self._before: str | None = None

    def __enter__(self) -> None:
        try:
            self._before = self._config.read_text()
        except FileNotFoundError:
            self._before = None
        before = without_action_script(self._before or "")
        if before and not before.endswith("\n"):
            before += "\n"
        _replace(self._config, before + f"action-script {self._script}\n")

    def __exit__(self, *exc) -> None:
        restore_config(self._config, without_action_script(self._before or "") if self._before is not None else None)


def without_action_script(text: str) -> str:
    """A CRIU configuration file's text without the line naming our script (left by a crash)."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not (line.startswith("action-script ") and line.rstrip().endswith(f"/{HOOK_NAME}")))


def restore_config(config: Path, text: str | None) -> None:
    if text:
        _replace(config, text)
    else:
        config.unlink(missing_ok=True)


def remove_from_config(config: Path) -> bool:
    """Recovery: take our script out of a container's CRIU configuration file; True if it was there."""
    try:
        text = config.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return False
    kept = without_action_script(text)
    if kept == text:
        return False
    restore_config(config, kept)
    return True


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.rename(path)
