"""The source side of a post-copy move (`pyshim migrate --lazy`): a checkpoint whose memory stays behind.

CheckpointContainer with gRPC metadata `pyshim-checkpoint-mode: lazy` and `pyshim-page-server: ADDR:PORT`:

1. the container is frozen (`runc pause`, the freezer cgroup) and stays frozen to the end;
2. `runc checkpoint --leave-running --lazy-pages --page-server ADDR:PORT --status-fd N` starts in a
   session of its own (a pyshim killed with -9 does not take it along) and is written down in the
   intent journal (its pid and start time); CRIU dumps everything but the anonymous memory, writes a
   byte to N, and serves the memory from its page pipes to the target's lazy-pages daemon;
3. once that byte came, the rootfs diff and the archive of the (small) non-memory images are written
   and the call returns: the mover ships the archive and restores on the target, which pulls pages.

CRIU ends when the target's lazy-pages daemon disconnects. It cannot tell a daemon that got every page
from one that died (both close the socket: CRIU 4.2 logs "Lazy pages transfer finished successfully"
either way, checked by hand), so CRIU's verdict decides nothing here: with --leave-running the frozen
tasks keep their whole memory whatever CRIU says, and the mover, who sees the target's own verdict
(verbose `lazyPages: complete`), ends the move with a second call: `lazy-finish` kills the frozen
container (EXITED, reason Checkpointed), `lazy-resume` thaws it and it runs on. Until one of those
comes the container stays frozen, also across a restart of pyshim: the source holds the complete
state until the mover has seen the last page arrive on the target.

The verbose ContainerStatus shows `lazyDump`: `serving` (CRIU is serving pages), `served` (CRIU ended
without error: waiting for lazy-finish/lazy-resume), `failed` (CRIU failed: the target cannot have
every page; still frozen, waiting for lazy-resume), with the page server and a message.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import os
import secrets
import select
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from criu_glue import archive_format as fmt
from criu_glue import procfs
from criu_glue.criu import log_excerpt
from criu_glue.lazy_pages import PageServer
from criu_glue.rootfs_diff import write_rootfs_diff
from oci.tree_removal import remove_tree
from pyshim.checkpoint_restore.checkpoint import (ArchiveMembers, Checkpointer, CheckpointResult, archive_temp_path)
from pyshim.errors import FailedPrecondition, InvalidArgument
from pyshim.internal import cgroups, host_caps, mounts, procs
from pyshim.internal.intents import Intent, IntentJournal, Operation
from pyshim.internal.phases import PhaseTimer
from pyshim.internal.runc import CheckpointRequest, Runc, RuncError
from pyshim.internal.state import ContainerRecord

log = logging.getLogger(__name__)

RUNC_LOG = "runc-checkpoint.log"  # runc's stdout and stderr, beside (not inside) what is archived
ARCHIVED_DIR = "archive"  # what goes into the archive: CRIU's images, its dump.log, the diff, metadata
# CRIU's line when the page server's client disconnected without an error (criu/mem.c).
_SERVED_LINE = b"Lazy pages transfer finished successfully"
_ADOPTED_POLL_SECONDS = 0.2
# lazy-finish: how long CRIU may take to notice the target's disconnect before it is stopped.
_FINISH_WAIT_SECONDS = 10.0


class DumpState(str, enum.Enum):
    SERVING = "serving"  # CRIU runs: the target may be pulling pages
    SERVED = "served"    # CRIU ended without an error; the container is still frozen
    FAILED = "failed"    # CRIU failed: the target cannot have every page; the container is still frozen


@dataclass
class _Dump:
    """A lazy dump in flight: its intent (the durable record) and what is known of its CRIU."""
    container_id: str
    intent: Intent
    base: Path
    page_server: str
    state: DumpState = DumpState.SERVING
    proc: subprocess.Popen | None = None  # ours; None when adopted after a restart
    pid: int = 0
    pid_start_ns: int = 0
    message: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def archived(self) -> Path:
        return self.base / ARCHIVED_DIR

    def as_status(self) -> dict:
        status = {"state": self.state.value, "pageServer": self.page_server}
        if self.message:
            status["message"] = self.message
        return status


def parse_page_server(text: str) -> PageServer:
    """InvalidArgument unless ADDR:PORT with a numeric address (CRIU resolves no names)."""
    try:
        return PageServer.parse(text)
    except ValueError as e:
        raise InvalidArgument(f"page server {text!r}: {e}; give ADDRESS:PORT, the address the target "
                              "node reaches this node at") from None


class LazyCheckpoints:
    def __init__(self, checkpointer: Checkpointer, runc: Runc, intents: IntentJournal, work_root: Path):
        self._checkpointer = checkpointer
        self._runc = runc
        self._intents = intents
        self._work_root = Path(work_root)
        self._work_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._dumps: dict[str, _Dump] = {}
        self._lock = threading.Lock()

    # ---- mode "lazy" ---------------------------------------------------------------------------

    def check_host(self) -> None:
        problem = host_caps.lazy_page_server_problem()
        if problem:
            raise FailedPrecondition(f"cannot serve a lazy checkpoint's memory: {problem}")

    def start(self, record: ContainerRecord, members: ArchiveMembers, location: Path, deadline: float,
              page_server: PageServer, durable: bool = True, netns_path: str = "") -> CheckpointResult:
        """Freeze, dump all but memory, archive that at `location`, leave CRIU serving the memory.
        On any error the container is thawed and runs on, and nothing is left."""
        self._checkpointer.check_enabled()
        self.check_host()
        with self._checkpointer.exclusive_running(record, deadline):
            self.refuse_while_dumped(record.id)
            return self._start_locked(record, members, location, deadline, page_server, durable, netns_path)

    def _start_locked(self, record, members: ArchiveMembers, location: Path, deadline: float,
                      page_server: PageServer, durable: bool, netns_path: str) -> CheckpointResult:
        started = time.monotonic()
        phases = PhaseTimer()
        tcp = self._checkpointer._wants_tcp_established(record)
        lower_dirs = mounts.overlay_lower_dirs(record.rootfs)
        token = secrets.token_hex(6)
        base = self._work_root / f"{record.id[:12]}-{token}"
        archive_tmp = archive_temp_path(location, token)
        intent = self._intents.begin(Operation.LAZY_CHECKPOINT, record.id, step="prepare", work_dir=str(base),
                                     archive_tmp=str(archive_tmp), location=str(location),
                                     cgroups_path=record.cgroups_path, page_server=str(page_server))
        dump = _Dump(record.id, intent, base, str(page_server))
        frozen = False
        try:
            images = dump.archived / fmt.CHECKPOINT_DIR
            images.mkdir(parents=True, mode=0o700)
            phases.mark("prepare")
            self._intents.advance(intent, "freeze")
            self._runc.pause(record.id)
            frozen, frozen_at = True, time.monotonic()
            phases.mark("pause")
            with self._checkpointer.network_locks.dumping(netns_path, record.id) as locking:
                try:
                    self._start_criu(record, dump, images, page_server, tcp, deadline)
                except BaseException:
                    # Stopped before its status, CRIU may still hold the pod's network lock (it lifts
                    # it itself before it starts serving pages, and on its own errors).
                    locking.killed()
                    raise
            phases.mark("dump")
            deleted = write_rootfs_diff(record.upper, dump.archived / fmt.ROOTFS_DIFF_TAR, members.diff_exclusions,
                                        lower_dirs=lower_dirs)
            phases.mark("diff")
            written = self._checkpointer._package(record, dump.archived, members, deleted, location, archive_tmp,
                                                  deadline, phases, durable)
        except BaseException:
            self._abandon(record, dump, thaw=frozen)
            archive_tmp.unlink(missing_ok=True)
            raise
        self._intents.advance(intent, "serving")
        with self._lock:
            self._dumps[record.id] = dump
        threading.Thread(target=self._watch, args=(dump,), daemon=True, name=f"lazy-dump-{record.id[:12]}").start()
        ready = time.monotonic()
        log.info("lazy checkpoint: archive written, CRIU serves the memory", extra={
            "container": record.id, "location": str(location), "page_server": dump.page_server,
            "archive_bytes": written.size, "phases_ms": phases.report()})
        return CheckpointResult(location, ready - frozen_at, ready - started, written.size, tcp, False,
                                phases.report(), written)

    def _start_criu(self, record, dump: _Dump, images: Path, page_server: PageServer, tcp: bool,
                    deadline: float) -> None:
        """runc checkpoint in its own session; returns once CRIU said the server listens. Its pid goes
        into the intent first: a pyshim killed from here on finds it at its next start."""
        ready_r, ready_w = os.pipe()
        try:
            req = CheckpointRequest(images, dump.archived, leave_running=True, file_locks=True, tcp_established=tcp,
                                    lazy_page_server=f"{page_server.address}:{page_server.port}", status_fd=ready_w)
            with open(dump.base / RUNC_LOG, "wb") as out:
                try:
                    dump.proc = subprocess.Popen(self._runc.checkpoint_command(record.id, req), stdin=subprocess.DEVNULL,
                                                 stdout=out, stderr=out, pass_fds=(ready_w,), start_new_session=True)
                except OSError as e:
                    raise FailedPrecondition(f"lazy checkpoint of {record.id}: cannot start runc: {e}") from None
            os.close(ready_w)
            ready_w = -1
            dump.pid, dump.pid_start_ns = dump.proc.pid, procs.start_time_ns(dump.proc.pid)
            self._intents.advance(dump.intent, "dump", runc_pid=dump.pid, runc_start_ns=dump.pid_start_ns)
            ready, _, _ = select.select([ready_r], [], [], max(0.1, deadline - time.monotonic()))
            byte = os.read(ready_r, 1) if ready else b""
        finally:
            os.close(ready_r)
            if ready_w >= 0:
                os.close(ready_w)
        if byte == b"\0":
            return
        _stop(dump.proc)
        why = "failed" if ready else "ran out of time"
        raise FailedPrecondition(
            f"lazy checkpoint of {record.id} {why} before its page server listened (runc exit "
            f"{dump.proc.returncode}): {log_excerpt(dump.base / RUNC_LOG, 3)}\nCRIU log ({fmt.DUMP_LOG}):\n"
            f"{log_excerpt(dump.archived / fmt.DUMP_LOG)}")

    def _abandon(self, record, dump: _Dump, thaw: bool) -> None:
        """A lazy checkpoint that failed before it was handed out: CRIU stopped, container thawed, all removed."""
        if dump.proc is not None:
            _stop(dump.proc)
        if thaw:
            self._thaw(record.id, record.cgroups_path)
        remove_tree(dump.base, ignore_errors=True)
        self._intents.finish(dump.intent)

    # ---- CRIU ends -----------------------------------------------------------------------------

    def _watch(self, dump: _Dump) -> None:
        if dump.proc is not None:
            code = dump.proc.wait()
        else:
            while _criu_alive(dump.pid, dump.pid_start_ns):
                time.sleep(_ADOPTED_POLL_SECONDS)
            code = None
        self._criu_ended(dump, code)

    def _criu_ended(self, dump: _Dump, code: int | None) -> None:
        served = _served(dump.archived / fmt.DUMP_LOG) and code in (0, None)
        dump.state = DumpState.SERVED if served else DumpState.FAILED
        if not served:
            dump.message = (f"CRIU's page server ended with an error (runc exit {code}); the target cannot have "
                            f"every page. CRIU: {log_excerpt(dump.archived / fmt.DUMP_LOG, 3)}")
        with contextlib.suppress(OSError):
            self._intents.advance(dump.intent, dump.state.value)
        dump.done.set()
        log.log(logging.INFO if served else logging.WARNING, "lazy checkpoint: CRIU's page server ended",
                extra={"container": dump.container_id, "state": dump.state.value, "runc_exit": code})

    # ---- modes "lazy-finish" and "lazy-resume" ---------------------------------------------------

    def finish(self, record: ContainerRecord, netns_path: str, timeout: float) -> None:
        """The target has every page: end the frozen container (it dies without running again). CRIU
        normally ended when the target's lazy-pages daemon disconnected; one still running after a short
        wait serves nobody any more (the target said it has everything) and is stopped."""
        dump = self._dump_of(record.id)
        if not dump.done.wait(min(timeout, _FINISH_WAIT_SECONDS)):
            log.warning("lazy checkpoint: CRIU's page server still runs after the target had every page; "
                        "stopped it", extra={"container": record.id})
            if dump.proc is not None:
                _stop(dump.proc)
            else:
                _kill_adopted(dump)
        location = Path(dump.intent.facts.get("location", ""))
        self._checkpointer._kill_frozen(record, location, netns_path)
        self._close(dump)
        log.info("lazy checkpoint finished: container ended", extra={"container": record.id})

    def resume(self, record: ContainerRecord) -> None:
        """The move failed: stop CRIU if it still serves, thaw the container, which runs on."""
        dump = self._dump_of(record.id)
        if dump.proc is not None:
            _stop(dump.proc)
        else:
            _kill_adopted(dump)
        self._thaw(record.id, record.cgroups_path)
        self._close(dump)
        log.warning("lazy checkpoint undone: container thawed, it runs on", extra={"container": record.id})

    def _dump_of(self, container_id: str) -> _Dump:
        with self._lock:
            dump = self._dumps.get(container_id)
        if dump is None:
            raise FailedPrecondition(f"container {container_id} has no lazy checkpoint in flight")
        return dump

    def _close(self, dump: _Dump) -> None:
        with self._lock:
            self._dumps.pop(dump.container_id, None)
        remove_tree(dump.base, ignore_errors=True)
        self._intents.finish(dump.intent)

    def _thaw(self, container_id: str, cgroups_path: str) -> None:
        try:
            self._runc.resume(container_id)
        except RuncError:
            # runc may say "not paused" while the freezer is still frozen (a CRIU killed mid-dump).
            if cgroups_path and cgroups.freezer_state(cgroups_path) in ("FROZEN", "FREEZING"):
                cgroups.thaw(cgroups_path)

    # ---- what others ask -----------------------------------------------------------------------

    def refuse_while_dumped(self, container_id: str) -> None:
        """Another checkpoint, or a second lazy one, of a container whose lazy dump is in flight."""
        with self._lock:
            dump = self._dumps.get(container_id)
        if dump is not None:
            raise FailedPrecondition(f"container {container_id} has a lazy checkpoint in flight (verbose status "
                                     f"lazyDump: {dump.state.value}); end it with pyshim-checkpoint-mode "
                                     "lazy-finish or lazy-resume first")

    def status(self, container_id: str) -> dict:
        """The verbose ContainerStatus field of a lazy dump in flight ({} otherwise)."""
        with self._lock:
            dump = self._dumps.get(container_id)
        return {"lazyDump": dump.as_status()} if dump is not None else {}

    def discard(self, record: ContainerRecord) -> None:
        """StopContainer or RemoveContainer of a container with a lazy dump in flight: CRIU stopped, the
        frozen tasks killed before they are thawed (they never run again), the dump's files removed."""
        with self._lock:
            dump = self._dumps.get(record.id)
        if dump is None:
            return
        if dump.proc is not None:
            _stop(dump.proc)
        else:
            _kill_adopted(dump)
        with contextlib.suppress(RuncError):
            self._runc.kill(record.id, "KILL", all_processes=True)
        self._thaw(record.id, record.cgroups_path)
        self._close(dump)
        log.warning("lazy checkpoint abandoned: the container was stopped or removed during the move",
                    extra={"container": record.id})

    # ---- after a restart -----------------------------------------------------------------------

    def recover(self, intents: list[Intent], running: set[str]) -> None:
        """At start-up, after the containers were reconciled (`running`: ids whose processes live). A dump
        whose CRIU still runs is adopted; one whose CRIU ended is judged by its log and waits, frozen, for
        the mover; one cut short before it was handed out is undone (thawed). Debris is deleted."""
        kept: set[Path] = set()
        for intent in intents:
            if intent.operation != Operation.LAZY_CHECKPOINT:
                continue
            facts = intent.facts
            base = Path(facts.get("work_dir", ""))
            dump = _Dump(intent.target, intent, base, facts.get("page_server", ""),
                         pid=int(facts.get("runc_pid", 0) or 0), pid_start_ns=int(facts.get("runc_start_ns", 0) or 0))
            handed_out = intent.step not in ("prepare", "freeze", "dump")
            if intent.target not in running:
                log.warning("recovery: lazy checkpoint of a container that no longer runs; dropped it",
                            extra={"container": intent.target, "step": intent.step})
                _kill_adopted(dump)
                self._close(dump)
                continue
            if not handed_out:
                _kill_adopted(dump)
                self._thaw(intent.target, facts.get("cgroups_path", ""))
                Path(facts.get("archive_tmp", "")).unlink(missing_ok=True) if facts.get("archive_tmp") else None
                self._close(dump)
                log.warning("recovery: lazy checkpoint cut short before its archive was handed out; container "
                            "thawed", extra={"container": intent.target, "step": intent.step})
                continue
            kept.add(base)
            with self._lock:
                self._dumps[intent.target] = dump
            if _criu_alive(dump.pid, dump.pid_start_ns):
                log.warning("recovery: CRIU page server of a lazy checkpoint outlived the daemon; adopted it",
                            extra={"container": intent.target, "pid": dump.pid})
                threading.Thread(target=self._watch, args=(dump,), daemon=True,
                                 name=f"lazy-dump-{intent.target[:12]}").start()
            else:
                self._criu_ended(dump, None)
                log.warning("recovery: CRIU page server of a lazy checkpoint ended while the daemon was down; the "
                            "container stays frozen for the mover", extra={"container": intent.target,
                                                                           "state": dump.state.value})
        for entry in sorted(self._work_root.iterdir()):
            if entry not in kept:
                log.warning("recovery: lazy checkpoint directory no dump owns; deleted it", extra={"path": str(entry)})
                remove_tree(entry, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGKILL runc and its CRIU (their session holds nothing else) and reap runc."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
    proc.wait()


def _kill_adopted(dump: _Dump) -> None:
    """A runc checkpoint that is not our child (adopted after a restart): its session, CRIU included."""
    if _criu_alive(dump.pid, dump.pid_start_ns):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(dump.pid, 9)  # runc led its own session: its pgid is its pid


def _criu_alive(pid: int, start_ns: int) -> bool:
    """`pid` is still the runc checkpoint we started (not a reused pid)."""
    argv = procfs.process_argv(pid) if pid > 0 else None
    if argv is None:
        return False
    return b"checkpoint" in argv and b"--lazy-pages" in argv and procs.start_time_ns(pid) == start_ns


def _served(dump_log: Path) -> bool:
    try:
        return _SERVED_LINE in dump_log.read_bytes()
    except OSError:
        return False
