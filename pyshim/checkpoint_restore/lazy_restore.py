"""Post-copy (lazy pages) restores: pyshim starts, watches and cleans up each restore's page source.

A lazy restore's process runs before its memory is in place; CRIU's lazy-pages daemon
(criu_glue/lazy_pages.py) serves the missing pages on fault and copies the rest in the background.
This module owns that daemon for the whole of its life:

- `start` launches it (its own session: a daemon of ours killed by the OOM killer must not take the
  workload's page source with it) before `runc restore --lazy-pages`, and writes down, fsynced, what
  it started in `<container dir>/lazy-pages.json` (the transfer's durable record), first with no pid
  (so that a crash during the start is found by the daemon's command line), then with its pid;
- `supervise` watches it once the process runs: when it exits, the record says `complete` (every page
  arrived; the socket and the page images are removed) or, if it died first while the process still
  runs, the process is killed (its missing pages would read as zeroes) with reason `LazyPagesFailed`;
- `discard` (RemoveContainer) kills a daemon still transferring and removes its socket;
- `recover` (start-up, after the containers' own recovery) adopts a daemon that outlived a killed
  pyshim, judges one that ended meanwhile by its log, and kills daemons no container owns.

The verbose ContainerStatus shows `status()`: `lazyPages` `transferring`/`complete`/`failed`/`ended`,
the bytes to bring and brought, and how long it took.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from criu_glue import lazy_pages
from criu_glue.criu import log_excerpt
from oci.tree_removal import remove_tree
from pyshim.annotations import RESTORE_LAZY_ANNOTATION, RESTORE_LAZY_PAGE_SERVER_ANNOTATION
from pyshim.errors import InvalidArgument
from pyshim.internal import procs
from pyshim.internal.atomic import write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "lazy-pages.json"
# How often an adopted daemon (not our child: no wait()) is looked for in /proc.
_ADOPTED_POLL_SECONDS = 0.1
# The reason a container killed because its memory could no longer arrive is reported with.
PAGES_LOST_REASON = "LazyPagesFailed"


class LazyState(str, enum.Enum):
    TRANSFERRING = "transferring"  # the daemon runs; pages are still coming
    COMPLETE = "complete"          # every page arrived; nothing of the transfer is left
    FAILED = "failed"              # the daemon died before every page arrived; the process was killed
    ENDED = "ended"                # the process ended (stopped, removed) before every page arrived


@dataclass(frozen=True)
class LazyChoice:
    """How a restore gets its memory, from the new request's annotations and the config's default."""
    lazy: bool
    # Where the pages come from; None: the checkpoint's own page images. A page server on the source node
    # (annotation io.pyshim.restore.lazy-page-server, set by `pyshim migrate --lazy`) for a lazy move.
    page_server: lazy_pages.PageServer | None = None


def lazy_choice(annotations, default: bool) -> LazyChoice:
    """InvalidArgument naming the annotation for a value that is neither "true" nor "false"."""
    raw = annotations.get(RESTORE_LAZY_ANNOTATION, "")
    if raw not in ("", "true", "false"):
        raise InvalidArgument(f"annotation {RESTORE_LAZY_ANNOTATION}={raw!r}: use \"true\" or \"false\"")
    server = annotations.get(RESTORE_LAZY_PAGE_SERVER_ANNOTATION, "")
    if not server:
        return LazyChoice(default if raw == "" else raw == "true")
    if raw == "false":
        raise InvalidArgument(f"annotation {RESTORE_LAZY_PAGE_SERVER_ANNOTATION} asks for a lazy restore, "
                              f"{RESTORE_LAZY_ANNOTATION}=false for an eager one: drop one of them")
    try:
        # A numeric address and a port only: the node's CRIU connects there and maps what it gets into
        # the restored process's own memory, nowhere else (no more than the request could run itself).
        return LazyChoice(True, lazy_pages.PageServer.parse(server))
    except ValueError as e:
        raise InvalidArgument(f"annotation {RESTORE_LAZY_PAGE_SERVER_ANNOTATION}={server!r}: {e} "
                              "(a numeric address: CRIU resolves no names)") from None


@dataclass
class LazyTransfer:
    """One lazy restore's page transfer, as written to `<work_dir>/lazy-pages.json` (reader and writer below)."""
    container_id: str
    work_dir: str
    images_dir: str
    page_server: str = ""  # "ADDR:PORT" of the source's page server; "" = the local page images
    state: LazyState = LazyState.TRANSFERRING
    pid: int = 0           # the daemon; 0 until started
    pid_start_ns: int = 0  # tells it from a process that reused the pid
    started_at_ns: int = 0
    restored_at_ns: int = 0  # when the process tree ran (runc restore returned)
    finished_at_ns: int = 0
    total_bytes: int = 0
    copied_bytes: int = 0
    message: str = ""

    def save(self) -> None:
        doc = dataclasses.asdict(self)
        doc["state"] = self.state.value
        write_atomic(Path(self.work_dir) / STATE_FILE, json.dumps(doc).encode(), mode=0o600)

    @classmethod
    def load(cls, work_dir: Path) -> "LazyTransfer | None":
        """The record in `work_dir`, None when there is none; a damaged one reads as a transfer of
        unknown state (recovery then judges it by the daemon's log)."""
        try:
            doc = json.loads((work_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return cls(container_id=work_dir.name, work_dir=str(work_dir), images_dir="")
        known = {f.name for f in dataclasses.fields(cls)}
        doc = {k: v for k, v in doc.items() if k in known}
        doc["state"] = LazyState(doc.get("state", LazyState.TRANSFERRING.value))
        return cls(**doc)

    def as_status(self) -> dict:
        status = {"lazyPages": self.state.value, "lazyPagesTotalBytes": self.total_bytes,
                  "lazyPagesCopiedBytes": self.copied_bytes,
                  "lazyPagesSource": self.page_server or "local images"}
        if self.finished_at_ns and self.restored_at_ns:
            status["lazyPagesMs"] = round((self.finished_at_ns - self.restored_at_ns) / 1e6, 1)
        if self.message:
            status["lazyPagesMessage"] = self.message
        return status


@dataclass
class _Watch:
    """A transfer this daemon watches: the record, the daemon (a Popen if ours, else an adopted pid)."""
    transfer: LazyTransfer
    reader: lazy_pages.ProgressReader
    proc: subprocess.Popen | None = None
    thread: threading.Thread | None = None
    starting: lazy_pages.StartingDaemon | None = None  # launched, not yet known to listen


def judge_outcome(code: int | None, progress: lazy_pages.LazyProgress,
                  still_runs: Callable[[], bool]) -> LazyState:
    """How a transfer ended, from the daemon's exit status (`code`, None when it is not ours to read)
    and its log. FAILED here means "the daemon failed": the caller kills the process and decides
    between FAILED and ENDED by whether it still ran.

    CRIU's lazy-pages daemon exits 0 once every process that handed over a uffd either has all its
    pages or has exited. A child that exits before its pages were copied (a shell's `sleep`) leaves
    the copied bytes short of the total, yet every page the container can still touch is in place:
    that is COMPLETE while the container runs, ENDED once the container itself has gone."""
    ok = code == 0 if code is not None else progress.all_transferred
    if not ok:
        return LazyState.FAILED
    if progress.copied_bytes >= progress.total_bytes or still_runs():
        return LazyState.COMPLETE
    return LazyState.ENDED


# Called when a running container's memory can no longer arrive: kill it with this message; returns
# True if it was running (and is now killed), False if it had already ended.
PagesLostHandler = Callable[[str, str], bool]


class LazyRestores:
    def __init__(self, containers_root: Path, criu: str = "criu", ready_timeout: float = 10.0):
        self._containers_root = Path(containers_root)
        self._criu = criu
        self._ready_timeout = ready_timeout
        self._watches: dict[str, _Watch] = {}
        self._lock = threading.Lock()
        self._on_pages_lost: PagesLostHandler = lambda container_id, message: False
        self._still_runs: Callable[[str], bool] = lambda container_id: True

    def on_pages_lost(self, handler: PagesLostHandler, still_runs: Callable[[str], bool]) -> None:
        """`handler` kills a container whose memory can no longer arrive; `still_runs` says whether a
        container's process still runs (a transfer that ended short is complete while it does)."""
        self._on_pages_lost, self._still_runs = handler, still_runs

    # ---- a restore ---------------------------------------------------------------------------

    def launch(self, container_id: str, work_dir: Path, images_dir: Path,
               page_server: lazy_pages.PageServer | None = None) -> None:
        """Start the page source of a restore that will run `runc restore --lazy-pages` in `work_dir`, as
        soon as the CRIU images are in `images_dir`: its start-up overlaps the rest of the restore's
        preparation; wait_ready() before runc. LazyPagesError when it cannot start (nothing left behind)."""
        transfer = LazyTransfer(container_id=container_id, work_dir=str(work_dir), images_dir=str(images_dir),
                                page_server=str(page_server) if page_server else "",
                                started_at_ns=time.time_ns())
        transfer.save()  # no pid yet: a crash from here on finds the daemon by its command line
        try:
            starting = lazy_pages.launch_lazy_pages(images_dir, work_dir, page_server, self._criu)
        except lazy_pages.LazyPagesError:
            _remove_files(work_dir, keep_log=True)
            raise
        transfer.pid, transfer.pid_start_ns = starting.proc.pid, procs.start_time_ns(starting.proc.pid)
        transfer.save()
        with self._lock:
            self._watches[container_id] = _Watch(transfer, lazy_pages.ProgressReader(work_dir / lazy_pages.LOG_NAME),
                                                 starting.proc, starting=starting)

    def wait_ready(self, container_id: str) -> None:
        """Until the launched daemon listens. LazyPagesError when it does not come up (it is killed and
        forgotten, its log kept for the error)."""
        with self._lock:
            watch = self._watches[container_id]
        starting, watch.starting = watch.starting, None
        if starting is None:
            return
        try:
            starting.wait_ready(self._ready_timeout)
        except lazy_pages.LazyPagesError:
            with self._lock:
                self._watches.pop(container_id, None)
            _remove_files(Path(watch.transfer.work_dir), keep_log=True)
            raise
        log.info("lazy-pages daemon started", extra={"container": container_id, "pid": watch.proc.pid,
                                                     "page_server": watch.transfer.page_server or "local"})

    def abort(self, container_id: str) -> None:
        """The restore failed: end its daemon and remove its files (its log stays for the error)."""
        with self._lock:
            watch = self._watches.pop(container_id, None)
        if watch is None:
            return
        _stop_daemon(watch)
        _remove_files(Path(watch.transfer.work_dir), keep_log=True)

    def log_excerpt(self, work_dir: Path) -> str:
        return log_excerpt(work_dir / lazy_pages.LOG_NAME)

    def supervise(self, container_id: str) -> None:
        """The process tree runs: watch the daemon until it exits."""
        with self._lock:
            watch = self._watches.get(container_id)
            if watch is None:
                return
            watch.transfer.restored_at_ns = time.time_ns()
            watch.transfer.save()
            watch.thread = threading.Thread(target=self._watch, args=(watch,), daemon=True,
                                            name=f"lazy-pages-{container_id[:12]}")
            watch.thread.start()

    def _watch(self, watch: _Watch) -> None:
        code: int | None
        if watch.proc is not None:
            code = watch.proc.wait()
        else:
            while lazy_pages.is_lazy_pages_daemon(watch.transfer.pid, Path(watch.transfer.work_dir)) \
                    and procs.start_time_ns(watch.transfer.pid) == watch.transfer.pid_start_ns:
                time.sleep(_ADOPTED_POLL_SECONDS)
            code = None  # not our child: its exit status is gone
        self._finished(watch, code)

    def _finished(self, watch: _Watch, code: int | None) -> None:
        """The daemon exited (`code`, None if unknown): record the outcome; kill the process if its
        memory can no longer arrive."""
        transfer = watch.transfer
        with self._lock:
            if self._watches.get(transfer.container_id) is not watch:
                return  # discarded meanwhile (RemoveContainer): it did the cleanup
            self._watches.pop(transfer.container_id)
        progress = watch.reader.read()
        work_dir = Path(transfer.work_dir)
        transfer.total_bytes, transfer.copied_bytes = progress.total_bytes, progress.copied_bytes
        transfer.finished_at_ns = time.time_ns()
        transfer.state = judge_outcome(code, progress, lambda: self._still_runs(transfer.container_id))
        if transfer.state == LazyState.FAILED:
            how = f"exit status {code}" if code is not None and code >= 0 else \
                f"signal {-code}" if code is not None else "while pyshim was down"
            reason = (f"the lazy-pages daemon ({'page server ' + transfer.page_server if transfer.page_server else 'local images'}) "
                      f"ended ({how}) after {transfer.copied_bytes} of {transfer.total_bytes} bytes; the "
                      "process could not get the rest of its memory and was killed. CRIU: "
                      + "; ".join(progress.errors[-3:] or [log_excerpt(work_dir / lazy_pages.LOG_NAME, 3)]))
            killed = self._on_pages_lost(transfer.container_id, reason)
            transfer.state = LazyState.FAILED if killed else LazyState.ENDED
            transfer.message = reason if killed else ""
        with contextlib.suppress(OSError):  # the container dir may be gone (removed meanwhile)
            transfer.save()
        _remove_files(work_dir, keep_log=transfer.state == LazyState.FAILED, images_dir=transfer.images_dir)
        level = logging.WARNING if transfer.state == LazyState.FAILED else logging.INFO
        log.log(level, "lazy pages transfer ended", extra={
            "container": transfer.container_id, "state": transfer.state.value,
            "bytes": transfer.copied_bytes, "total_bytes": transfer.total_bytes,
            "ms": transfer.as_status().get("lazyPagesMs")})

    def status(self, container_id: str, work_dir: Path) -> dict:
        """The verbose ContainerStatus fields of a lazy restore ({} for an eager one)."""
        with self._lock:
            watch = self._watches.get(container_id)
        if watch is not None:
            progress = watch.reader.read()
            watch.transfer.total_bytes, watch.transfer.copied_bytes = progress.total_bytes, progress.copied_bytes
            return watch.transfer.as_status()
        transfer = LazyTransfer.load(work_dir)
        return transfer.as_status() if transfer is not None else {}

    def wait(self, container_id: str, timeout: float) -> bool:
        """Wait until the transfer is no longer watched (ended one way or another); True if it is not."""
        with self._lock:
            watch = self._watches.get(container_id)
        if watch is None or watch.thread is None:
            return watch is None
        watch.thread.join(timeout)
        return not watch.thread.is_alive()

    def discard(self, container_id: str, work_dir: Path) -> None:
        """RemoveContainer: end a daemon still transferring and remove what it left. Idempotent."""
        with self._lock:
            watch = self._watches.pop(container_id, None)
        if watch is not None:
            _stop_daemon(watch)
        else:
            transfer = LazyTransfer.load(work_dir)
            if transfer is not None and transfer.state == LazyState.TRANSFERRING:
                _kill_adopted(transfer)
        _remove_files(work_dir, keep_log=False)
        with contextlib.suppress(FileNotFoundError):
            (work_dir / STATE_FILE).unlink()

    # ---- after a daemon restart --------------------------------------------------------------

    def recover(self, containers: Iterable[tuple[str, Path, bool]]) -> None:
        """`containers`: (id, work dir, whether its process runs) of every container record. Adopt the
        daemons of running lazy restores, judge those that ended while pyshim was down, and kill the
        daemons no running restore owns."""
        owned: set[Path] = set()
        for container_id, work_dir, running in containers:
            transfer = LazyTransfer.load(work_dir)
            if transfer is None or transfer.state != LazyState.TRANSFERRING:
                continue
            alive = _daemon_alive(transfer)
            watch = _Watch(transfer, lazy_pages.ProgressReader(work_dir / lazy_pages.LOG_NAME))
            if running and alive:
                owned.add(work_dir)
                log.warning("recovery: lazy-pages daemon of a running restore outlived the daemon; adopted it",
                            extra={"container": container_id, "pid": transfer.pid})
                with self._lock:
                    self._watches[container_id] = watch
                watch.thread = threading.Thread(target=self._watch, args=(watch,), daemon=True,
                                                name=f"lazy-pages-{container_id[:12]}")
                watch.thread.start()
                continue
            if alive:
                _kill_adopted(transfer)
            if running:
                # It ended while pyshim was down: its log says whether every page arrived.
                with self._lock:
                    self._watches[container_id] = watch
                self._finished(watch, None)
                log.warning("recovery: lazy-pages daemon ended while the daemon was down",
                            extra={"container": container_id, "state": transfer.state.value})
            else:
                transfer.state, transfer.finished_at_ns = LazyState.ENDED, time.time_ns()
                transfer.save()
                _remove_files(work_dir, keep_log=False, images_dir=transfer.images_dir)
                log.warning("recovery: lazy-pages daemon of a container that no longer runs; ended it",
                            extra={"container": container_id, "pid": transfer.pid})
        for pid, work_dir in lazy_pages.find_daemons(self._containers_root).items():
            if work_dir not in owned:
                log.warning("recovery: lazy-pages daemon no running restore owns; killed it",
                            extra={"pid": pid, "work_dir": str(work_dir)})
                procs.kill(pid)
                with contextlib.suppress(FileNotFoundError):
                    (work_dir / lazy_pages.SOCKET_NAME).unlink()


def _stop_daemon(watch: _Watch) -> None:
    """Kill a watch's daemon: ours (launched, or known to listen) or an adopted one."""
    if watch.starting is not None:
        watch.starting.abandon()
    elif watch.proc is not None:
        lazy_pages.stop(watch.proc)
    else:
        _kill_adopted(watch.transfer)


def _daemon_alive(transfer: LazyTransfer) -> bool:
    return lazy_pages.is_lazy_pages_daemon(transfer.pid, Path(transfer.work_dir)) and \
        procs.start_time_ns(transfer.pid) == transfer.pid_start_ns


def _kill_adopted(transfer: LazyTransfer) -> None:
    """A daemon that is not our child: kill it by pid once sure the pid is still it, or by its
    command line when the record has no pid yet (killed between the start and the save)."""
    if transfer.pid and _daemon_alive(transfer):
        procs.kill(transfer.pid)
        return
    for pid, work_dir in lazy_pages.find_daemons(Path(transfer.work_dir).parent).items():
        if work_dir == Path(transfer.work_dir):
            procs.kill(pid)


def _remove_files(work_dir: Path, keep_log: bool, images_dir: str = "") -> None:
    """The socket always (CRIU leaves it); the page images once no daemon reads them; the log unless
    it explains a failure."""
    names = [lazy_pages.SOCKET_NAME] + ([] if keep_log else [lazy_pages.LOG_NAME])
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(work_dir / name)
    if images_dir:
        remove_tree(Path(images_dir), ignore_errors=True)
