"""CheckpointContainer's machinery: freeze, `runc checkpoint`, rootfs diff, thaw, archive.

The container is frozen (cgroup freezer) before CRIU runs and thawed only after the writable-layer
diff is taken, so memory and files are one instant. A checkpoint that stops the container (to move
it) keeps it frozen until the archive is complete and then kills it. The archive holds every memory
page of the process, secrets included: it is written 0600 to a temporary name beside the target and
renamed into place only when complete. Whatever fails, the container ends up running and thawed, and no
archive or temporary file is left.

A kill -9 of the daemon mid-checkpoint must not leave that promise broken either: before anything is
made, the intent journal names the container, its freezer cgroup, the CRIU work directory and the
archive's temporary path (both names chosen up front), and each step (freeze, dump, thaw, archive,
kill) is announced before it is done. `recover` reads the open intents at start-up and thaws,
deletes and logs (see `_recover_checkpoint`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

from criu_glue import archive_format as fmt
from criu_glue import portable_archive as portable
from criu_glue.archive import ArchiveDigest, write_archive
from criu_glue.criu import criu_availability, has_established_tcp, log_excerpt, read_dump_stats
from criu_glue.rootfs_diff import write_rootfs_diff
from oci.tree_removal import remove_tree
from pyshim.config import CheckpointSettings
from pyshim.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from pyshim.checkpoint_restore import post_dump_hook, tcp_lock
from pyshim.checkpoint_restore.criu_network_lock import CriuNetworkLocks
from pyshim.checkpoint_restore.records import CheckpointFacts
from pyshim.internal import cgroups, crashpoints, mounts
from pyshim.internal.intents import Intent, IntentJournal, Operation
from pyshim.internal.phases import PhaseTimer
from pyshim.internal.runc import CheckpointRequest, Runc, RuncError, RuncTimeout
from pyshim.internal.state import ContainerRecord, ContainerState

log = logging.getLogger(__name__)

# Container paths that belong to the node or the kubelet, never to a checkpoint's rootfs diff.
NODE_MANAGED_PATHS = ("/proc", "/sys", "/dev", "/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/run/secrets")
COMPRESSIONS = ("none", "gzip", "zstd")
TCP_POLICIES = ("auto", "always", "never")


@dataclass(frozen=True)
class StoppedByCheckpoint:
    """Found at start-up: a stopping checkpoint completed its archive and killed the container, but
    the daemon died before recording that (CheckpointContainer's answer was never sent)."""
    container_id: str
    checkpoint: CheckpointFacts  # what is known: the archive and when it was written, no figures


@dataclass(frozen=True)
class CheckpointResult:
    location: Path
    frozen_seconds: float
    total_seconds: float
    archive_bytes: int
    tcp_established: bool
    stopped: bool
    phases_ms: dict
    archive_digest: ArchiveDigest | None = None  # computed while the archive was written


def validate_location(location: str) -> Path:
    if not location:
        raise InvalidArgument("checkpoint location is empty: give the absolute path of the archive to write")
    path = Path(location)
    if not path.is_absolute():
        raise InvalidArgument(f"checkpoint location {location!r} is not an absolute path")
    if not path.parent.is_dir():
        raise InvalidArgument(f"checkpoint location {location!r}: directory {path.parent} does not exist")
    if path.is_dir():
        raise InvalidArgument(f"checkpoint location {location!r} is a directory; name the archive file")
    return path


class Checkpointer:
    def __init__(self, settings: CheckpointSettings, runc: Runc, work_root: Path,
                 intents: IntentJournal | None = None):
        if settings.compression not in COMPRESSIONS:
            raise InvalidArgument(f"checkpoint.compression must be one of {COMPRESSIONS}, not {settings.compression!r}")
        if settings.tcp_established not in TCP_POLICIES:
            raise InvalidArgument(f"checkpoint.tcp_established must be one of {TCP_POLICIES}")
        self._settings = settings
        self._runc = runc
        self._work_root = Path(work_root)
        self._work_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._intents = intents if intents is not None else IntentJournal(self._work_root.parent / "state" / "intents")
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.criu = criu_availability(settings.min_criu_version)
        # Checkpoints of containers that name their own CRIU configuration take the diff inside
        # CRIU's freeze, without pausing them first (post_dump_hook.py).
        self._post_dump = post_dump_hook.PostDumpHook(self._work_root.parent)
        # A CRIU killed at the deadline leaves its lock on the pod's whole network (criu_network_lock.py).
        self.network_locks = CriuNetworkLocks()

    def _lock_for(self, container_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(container_id, threading.Lock())

    def check_enabled(self) -> None:
        if not self._settings.enable_checkpoint:
            raise FailedPrecondition("checkpointing is disabled in this daemon's configuration "
                                     "(checkpoint.enable_checkpoint = false)")
        if not self.criu.usable:
            raise FailedPrecondition(f"cannot checkpoint: {self.criu.reason}")

    def checkpoint(self, record: ContainerRecord, members: "ArchiveMembers", location: Path,
                   deadline: float, stop: bool = False, netns_path: str = "", durable: bool = True) -> CheckpointResult:
        """Checkpoint a running container to `location`. `deadline` is time.monotonic().

        It keeps running, or with `stop` (a move) it is killed once the archive is complete, its
        TCP connections locked in its pod's `netns_path` first; if anything fails it keeps running
        either way. `durable` False skips the archive's fsync (a move's throwaway archive)."""
        self.check_enabled()
        with self.exclusive_running(record, deadline):
            return self._checkpoint_locked(record, members, location, deadline, stop, netns_path, durable)

    @contextlib.contextmanager
    def exclusive_running(self, record: ContainerRecord, deadline: float):
        """Hold the container's checkpoint lock (one checkpoint of a container at a time, of any kind: a
        second waits for the first, within its own deadline), and refuse a container that is not running."""
        lock = self._lock_for(record.id)
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise DeadlineExceeded(f"container {record.id} is being checkpointed by another call; gave up waiting")
        try:
            if record.state != ContainerState.RUNNING:
                raise FailedPrecondition(f"container {record.id} is {record.state.value}: only a running "
                                         "container can be checkpointed")
            yield
        finally:
            lock.release()

    def _checkpoint_locked(self, record, members: "ArchiveMembers", location: Path, deadline: float,
                           stop: bool, netns_path: str, durable: bool = True) -> CheckpointResult:
        started = time.monotonic()
        phases = PhaseTimer()
        tcp = self._wants_tcp_established(record)
        # Read before freezing: the frozen window is for CRIU and the diff only.
        lower_dirs = mounts.overlay_lower_dirs(record.rootfs)
        # Frozen by CRIU itself (no runc pause first) where the container's CRIU configuration file
        # is ours; a stopping checkpoint keeps the pause-first path (see post_dump_hook.py).
        criu_config = None if stop else self._post_dump.config_for(record.bundle)
        # Both names are chosen, and written down, before either exists: recovery finds them by the intent.
        token = secrets.token_hex(6)
        work = self._work_root / f"{record.id[:12]}-{token}"
        archive_tmp = archive_temp_path(location, token)
        intent = self._intents.begin(Operation.CHECKPOINT_CONTAINER, record.id, step="prepare",
                                     work_dir=str(work), archive_tmp=str(archive_tmp), location=str(location),
                                     cgroups_path=record.cgroups_path, netns_path=netns_path,
                                     mode="stop" if stop else "leave-running",
                                     criu_config=str(criu_config or ""))
        stopped = False
        frozen_by = "runc pause" if criu_config is None else "criu"
        thaw_failed = False
        try:
            work.mkdir(mode=0o700)
            images = work / fmt.CHECKPOINT_DIR
            images.mkdir()
            phases.mark("prepare")
            # Recovery does for "dump" what it does for "freeze" (thaw if frozen, delete) and more.
            self._intents.advance(intent, "freeze" if criu_config is None else "dump")
            if criu_config is None:
                self._runc.pause(record.id)
                phases.mark("pause")
            frozen_at = time.monotonic()
            try:
                # No journal write here: recovery does for "dump" exactly what it does for "freeze" (thaw,
                # delete), and an fsync would lengthen the frozen window for nothing. The crash point stays.
                crashpoints.reached(f"{Operation.CHECKPOINT_CONTAINER.value}:dump")
                if criu_config is None:
                    deleted = self._dump_and_diff(record, work, members, lower_dirs, tcp, deadline, phases,
                                                  netns_path)
                else:
                    frozen_by, frozen_for, deleted = self._dump_frozen_by_criu(
                        record, work, members, lower_dirs, tcp, deadline, phases, criu_config, netns_path)
                if stop:
                    # Stopping for a move: the process must not run on after its image was taken, or
                    # its restored copy would repeat what it did meanwhile. It stays frozen until the
                    # archive is safe, and dies only then; any failure before that thaws it instead.
                    self._intents.advance(intent, "archive")
                    written = self._package(record, work, members, deleted, location, archive_tmp, deadline,
                                            phases, durable)
                    self._intents.advance(intent, "kill")
                    self._kill_frozen(record, location, netns_path)
                    stopped = True
                    # Killed here, the daemon leaves an EXITED container whose end is this checkpoint's:
                    # recovery reports it so (StoppedByCheckpoint).
                    crashpoints.reached("checkpoint_container:stopped")
                    phases.mark("kill")
            finally:
                if not stopped:
                    try:
                        self._thaw(record) if criu_config is None else self._thaw_if_left_frozen(record)
                    except RuncError:
                        thaw_failed = True
                        raise
            frozen = time.monotonic() - frozen_at if frozen_by == "runc pause" else frozen_for
            if not stop:
                phases.mark("resume")
                self._intents.advance(intent, "archive")
                written = self._package(record, work, members, deleted, location, archive_tmp, deadline, phases,
                                        durable)
        finally:
            remove_tree(work, ignore_errors=True)
            archive_tmp.unlink(missing_ok=True)  # write_archive removes it on errors; this is belt and braces
            if not thaw_failed:  # else the intent stays open: the next start tries to thaw it again
                self._intents.finish(intent)
        result = CheckpointResult(location, frozen, time.monotonic() - started, written.size, tcp,
                                  stopped, phases.report(), written)
        log.info("container checkpointed", extra={
            "container": record.id, "location": str(location), "frozen_ms": round(frozen * 1000, 1),
            "total_ms": round(result.total_seconds * 1000, 1), "archive_bytes": result.archive_bytes,
            "tcp_established": tcp, "stopped": stopped, "lower_layers": len(lower_dirs),
            "frozen_by": frozen_by, "phases_ms": result.phases_ms})
        return result

    # ---- recovery after a crash ----------------------------------------------------------------

    def recover(self, intents: list[Intent]) -> list[StoppedByCheckpoint]:
        """At start-up, before serving: repair every checkpoint a killed daemon left half-done, then
        delete whatever is left in the CRIU work root (no checkpoint runs yet, so all of it is debris).
        Idempotent: an intent is closed only after its repair, and each repair may run twice.
        Returns the containers a stopping checkpoint had killed: their records must say so, once the
        container recovery has recorded their exit (ContainerManager.note_stopped_by_checkpoint)."""
        stopped = []
        for intent in intents:
            if intent.operation == Operation.CHECKPOINT_CONTAINER:
                stop = self._recover_checkpoint(intent)
                if stop is not None:
                    stopped.append(stop)
                self._intents.finish(intent)
        for entry in sorted(self._work_root.iterdir()):
            log.warning("recovery: CRIU work directory of no running checkpoint found; deleted it",
                        extra={"path": str(entry)})
            _remove_path(entry)
        return stopped

    def _recover_checkpoint(self, intent: Intent) -> StoppedByCheckpoint | None:
        container_id, facts = intent.target, intent.facts
        stop = None
        location, archive_tmp = Path(facts.get("location", "")), Path(facts.get("archive_tmp", ""))
        if facts.get("criu_config") and post_dump_hook.remove_from_config(Path(facts["criu_config"])):
            log.warning("recovery: CRIU configuration file of an interrupted checkpoint put back",
                        extra={"container": container_id, "path": facts["criu_config"]})
        # Nothing is frozen before the "freeze" step was announced; from then on it may be.
        if intent.step != "prepare":
            thawed = self._thaw_after_crash(container_id, facts.get("cgroups_path", ""))
            if thawed:
                log.warning("recovery: container left frozen by an interrupted checkpoint; thawed it",
                            extra={"container": container_id, "step": intent.step, "how": thawed})
        if intent.step == "kill":
            # A stopping checkpoint killed after its archive was renamed into place, before (or while)
            # it killed the container. The archive is complete and consistent: it was taken while the
            # container was frozen, and nothing ran since. We keep it (the caller may have it already
            # as the answer to a retried call, and deleting a complete archive loses work), but we do
            # not finish the kill: the caller was never told the checkpoint succeeded, so the
            # container must not vanish on the strength of an unanswered call. It runs on, thawed,
            # with the lock on its connections lifted; a retry checkpoints it afresh.
            state = self._runc_state(container_id)
            if state is not None and state.status in ("running", "paused"):
                netns_path = facts.get("netns_path", "")
                if netns_path:
                    with contextlib.suppress(Exception):  # the pod's netns may be gone with the pod
                        tcp_lock.unlock_all(netns_path, container_id)
                log.warning("recovery: stopping checkpoint interrupted before the kill; the container keeps "
                            "running and the complete archive is kept",
                            extra={"container": container_id, "location": str(location)})
            elif location.is_file():
                # The kill was done: the container ended because of this checkpoint, whose archive
                # is complete. Its record must say so, not that it failed (SIGKILL's exit 137).
                log.warning("recovery: stopping checkpoint interrupted after the kill; archive kept, "
                            "the container is reported stopped by it",
                            extra={"container": container_id, "location": str(location)})
                stop = StoppedByCheckpoint(container_id, CheckpointFacts(
                    location=str(location), time_ns=location.stat().st_mtime_ns, stopped=True))
        for path, what in ((Path(facts.get("work_dir", "")), "CRIU work directory"),
                           (archive_tmp, "partial archive")):
            if str(path) not in ("", ".") and (path.exists() or path.is_symlink()):
                _remove_path(path)
                log.warning(f"recovery: {what} of an interrupted checkpoint found; deleted it",
                            extra={"container": container_id, "path": str(path), "step": intent.step})
        return stop

    def _runc_state(self, container_id: str):
        try:
            return self._runc.state(container_id)
        except RuncError:
            return None

    def _thaw_after_crash(self, container_id: str, cgroups_path: str) -> str:
        """Thaw a container a killed checkpoint may have left frozen; returns how ("" = was not frozen).
        runc first (it keeps its state in step); the freezer cgroup itself when runc knows the
        container no more (its processes would otherwise stay frozen, unkillable by a plain signal)."""
        state = self._runc_state(container_id)
        if state is not None and state.status == "paused":
            try:
                self._runc.resume(container_id)
                return "runc resume"
            except RuncError as e:
                log.warning("recovery: runc resume failed; thawing the freezer cgroup directly",
                            extra={"container": container_id, "error": e.message})
        if cgroups_path and cgroups.freezer_state(cgroups_path) in ("FROZEN", "FREEZING"):
            cgroups.thaw(cgroups_path)
            return "freezer.state = THAWED"
        return ""

    def _dump_and_diff(self, record, work: Path, members: "ArchiveMembers", lower_dirs: list, tcp: bool,
                       deadline: float, phases: PhaseTimer, netns_path: str = "") -> list[str]:
        """CRIU's images and the writable-layer diff of a frozen container; returns the deleted paths."""
        self._dump(record, CheckpointRequest(work / fmt.CHECKPOINT_DIR, work, leave_running=True,
                                             file_locks=True, tcp_established=tcp), deadline, netns_path)
        phases.mark("dump")
        # Past the deadline the caller has given up: thaw now rather than diff for nobody.
        _check_deadline(deadline, f"checkpoint of {record.id} ran out of time after CRIU's dump")
        deleted = write_rootfs_diff(record.upper, work / fmt.ROOTFS_DIFF_TAR, members.diff_exclusions,
                                    lower_dirs=lower_dirs)
        phases.mark("diff")
        return deleted

    def _dump_frozen_by_criu(self, record, work: Path, members: "ArchiveMembers", lower_dirs: list, tcp: bool,
                             deadline: float, phases: PhaseTimer, criu_config: Path,
                             netns_path: str = "") -> tuple[str, float, list[str]]:
        """CRIU's images and the writable-layer diff, taken at CRIU's post-dump action while CRIU holds
        the container frozen; nothing paused it before. Returns who froze it, for how long, and the
        deleted paths. A CRIU that never ran the hook switches this daemon to the pause-first path."""
        req = CheckpointRequest(work / fmt.CHECKPOINT_DIR, work, leave_running=True, file_locks=True,
                                tcp_established=tcp)

        def diff() -> list[str]:
            # Past the deadline the caller has given up: let CRIU thaw now rather than diff for nobody.
            _check_deadline(deadline, f"checkpoint of {record.id} ran out of time after CRIU's dump")
            return write_rootfs_diff(record.upper, work / fmt.ROOTFS_DIFF_TAR, members.diff_exclusions,
                                     lower_dirs=lower_dirs)
        try:
            with self.network_locks.dumping(netns_path, record.id) as dump:
                try:
                    hooked, deleted = self._post_dump.dump(self._runc, record.id, req, criu_config, deadline, diff)
                except RuncTimeout:
                    dump.killed()
                    raise
        except post_dump_hook.HookNotRun as e:
            log.error("CRIU ran no post-dump hook; this daemon pauses containers before checkpoints from now on",
                      extra={"container": record.id, "error": e.message})
            self._post_dump.usable = False
            remove_tree(req.image_path, ignore_errors=True)
            req.image_path.mkdir()
            self._runc.pause(record.id)
            paused_at = time.monotonic()
            try:
                deleted = self._dump_and_diff(record, work, members, lower_dirs, tcp, deadline, phases, netns_path)
            finally:
                self._thaw(record)
            return "runc pause (CRIU ran no post-dump hook)", time.monotonic() - paused_at, deleted
        except RuncTimeout as e:
            raise DeadlineExceeded(f"checkpoint of {record.id}: {e.message}") from None
        except RuncError as e:
            raise FailedPrecondition(f"checkpoint of {record.id} failed: {e.message}\n"
                                     f"CRIU log ({fmt.DUMP_LOG}):\n{log_excerpt(work / fmt.DUMP_LOG)}") from None
        phases.mark("dump")  # runc checkpoint, start to end: the diff ran inside it
        phases.add("post_dump_wait", hooked.hook_wait_ms)
        phases.add("diff", hooked.diff_ms)
        return "criu", hooked.frozen_seconds, deleted

    def _thaw_if_left_frozen(self, record: ContainerRecord) -> None:
        """CRIU thaws what it froze, also when it fails or our hook says no; only a CRIU killed (at the
        deadline) while freezing the cgroup leaves it frozen. One file read in the usual case."""
        if cgroups.freezer_state(record.cgroups_path) in ("FROZEN", "FREEZING"):
            self._thaw(record)

    def _package(self, record, work: Path, members: "ArchiveMembers", deleted: list[str], location: Path,
                 archive_tmp: Path, deadline: float, phases: PhaseTimer, durable: bool = True) -> ArchiveDigest:
        """Metadata members, then the archive at `location` (complete or not at all); its digest."""
        # Decoding them takes a crit process (~70 ms): never while frozen, nor on the caller's time.
        _log_dump_stats_later(record.id, work)
        members.write(work, deleted)
        self._move_criu_outputs(work)
        phases.mark("metadata")
        _check_deadline(deadline, f"checkpoint of {record.id} ran out of time before the archive was written")
        written = _write_archive_by_deadline(location, archive_tmp, work, self._settings.compression, deadline,
                                             f"checkpoint of {record.id}", durable)
        phases.mark("archive")
        return written

    def _kill_frozen(self, record: ContainerRecord, location: Path, netns_path: str) -> None:
        """SIGKILL every process of a frozen container, then thaw it so that they die at once.

        Frozen tasks cannot run a signal handler: nothing happens between the image and the end.
        Their established connections are locked first, so that peers see no FIN or RST and a
        restore at the same address picks them up. If the kill fails the container lives on, its
        connections unlocked, and the archive, now stale, goes."""
        locked = False
        try:
            if netns_path:
                connections = tcp_lock.established_connections(cgroups.processes(record.cgroups_path))
                if connections:
                    tcp_lock.lock(netns_path, record.id, connections)
                    locked = True
            self._runc.kill(record.id, "KILL", all_processes=True)
        except (RuncError, tcp_lock.LockError) as e:
            location.unlink(missing_ok=True)
            if locked:
                tcp_lock.unlock_all(netns_path, record.id)
            if isinstance(e, tcp_lock.LockError):
                raise FailedPrecondition(f"checkpoint of {record.id}: cannot lock its TCP connections "
                                         f"before stopping it: {e}") from None
            raise
        finally:
            self._thaw(record)

    def _dump(self, record: ContainerRecord, req: CheckpointRequest, deadline: float, netns_path: str) -> None:
        try:
            with self.network_locks.dumping(netns_path, record.id) as dump:
                try:
                    self._runc.checkpoint(record.id, req, timeout=max(0.1, deadline - time.monotonic()))
                except RuncTimeout:
                    dump.killed()
                    raise
        except RuncTimeout as e:
            raise DeadlineExceeded(f"checkpoint of {record.id}: {e.message}") from None
        except RuncError as e:
            raise FailedPrecondition(f"checkpoint of {record.id} failed: {e.message}\n"
                                     f"CRIU log ({fmt.DUMP_LOG}):\n{log_excerpt(req.work_path / fmt.DUMP_LOG)}") from None

    def _thaw(self, record: ContainerRecord) -> None:
        try:
            self._runc.resume(record.id)
            return
        except RuncError as e:
            error = e
        # A CRIU stopped at the deadline thaws the freezer cgroup to run its parasite and, killed,
        # never freezes it again: `runc resume` then fails with "not paused" on a running container.
        try:
            state = self._runc.state(record.id)
        except RuncError:
            state = None
        if state is not None and state.status != "paused":
            log.info("container was already thawed after checkpoint", extra={
                "container": record.id, "status": state.status, "resume_error": error.message})
            return
        try:
            self._runc.resume(record.id)  # once more: a transient failure must not leave it frozen
            return
        except RuncError:
            pass
        # Never leave a frozen container behind silently: this is the one failure a user must see.
        log.error("container could not be thawed after checkpoint", extra={"container": record.id,
                                                                            "error": error.message})
        raise error

    def _wants_tcp_established(self, record: ContainerRecord) -> bool:
        policy = self._settings.tcp_established
        if policy != "auto":
            return policy == "always"
        return bool(record.pid) and has_established_tcp(record.pid)

    @staticmethod
    def _move_criu_outputs(work: Path) -> None:
        """runc leaves dump.log and stats-dump in the work dir; the archive keeps them at its top level."""
        for name in (fmt.DUMP_LOG, fmt.STATS_DUMP):
            inside = work / fmt.CHECKPOINT_DIR / name
            if inside.exists() and not (work / name).exists():
                inside.rename(work / name)


def _log_dump_stats_later(container_id: str, work: Path) -> None:
    """Log CRIU's dump statistics (freezing/frozen time, pages) from a background thread.

    The work directory is gone by then, so the few bytes of stats-dump are copied to a private
    temporary file that the thread decodes with crit and removes.
    """
    for candidate in (work / fmt.STATS_DUMP, work / fmt.CHECKPOINT_DIR / fmt.STATS_DUMP):
        try:
            data = candidate.read_bytes()
            break
        except OSError:
            continue
    else:
        return

    def decode() -> None:
        try:
            with tempfile.NamedTemporaryFile(prefix="pyshim-stats-dump-") as f:
                f.write(data)
                f.flush()
                stats = read_dump_stats(Path(f.name))
            if stats:
                log.info("CRIU dump statistics", extra={"container": container_id, **stats.as_log_fields()})
        except Exception:  # noqa: BLE001 - statistics must never disturb a checkpoint
            log.exception("cannot decode CRIU dump statistics", extra={"container": container_id})

    # Not a daemon thread: a daemon shutting down right after a checkpoint waits the few ms for it
    # rather than leave its temporary file behind.
    threading.Thread(target=decode, name=f"criu-stats-{container_id[:12]}", daemon=False).start()


def _check_deadline(deadline: float, message: str) -> None:
    if time.monotonic() >= deadline:
        raise DeadlineExceeded(message)


# A gRPC caller's clock started before ours: an archive finished this close to the deadline may
# already be one the caller gave up on, and must then not appear.
DEADLINE_MARGIN_SECONDS = 0.05


def archive_temp_path(location: Path, token: str) -> Path:
    """The hidden file an archive is written to before it is renamed to `location`."""
    return location.parent / f".{location.name}.pyshim-{token}.tmp"


def archive_temp_glob(location: Path) -> str:
    """The names archive_temp_path gives, as a glob pattern in `location`'s directory: `pyshim migrate
    --direct` streams the archive from that file while it is written."""
    return f".{location.name}.pyshim-*.tmp"


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        remove_tree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_archive_by_deadline(location: Path, archive_tmp: Path, work: Path, compression: str, deadline: float,
                               what: str, durable: bool = True) -> ArchiveDigest:
    """write_archive, but the archive appears at `location` only if it was finished in time: a caller
    that gave up must never find an archive it was told failed."""
    def in_time() -> None:
        if time.monotonic() + DEADLINE_MARGIN_SECONDS >= deadline:
            raise DeadlineExceeded(f"{what} ran out of time while writing the archive; it was discarded")

    return write_archive(location, work, compression, before_rename=in_time, tmp_path=archive_tmp, durable=durable)


@dataclass
class ArchiveMembers:
    """The archive's metadata members (everything but CRIU's images and the rootfs diff)."""
    config: "fmt.CheckpointConfig"
    spec: dict
    status: Message  # the CRI ContainerStatus
    bind_mounts: list
    log_path: str
    diff_exclusions: list[str]

    def write(self, work: Path, deleted: list[str]) -> None:
        portable.forget_root_mode(work / fmt.CHECKPOINT_DIR)  # so that Podman and CRI-O restore it too
        fmt.write_config(work, self.config)
        fmt.write_spec(work, self.spec)
        fmt.write_status(work, self.status)
        fmt.write_bind_mounts(work, self.bind_mounts)
        fmt.write_deleted_files(work, deleted)
        if self.log_path and Path(self.log_path).is_file():
            shutil.copyfile(self.log_path, work / fmt.CONTAINER_LOG)


def bind_mount_of(host_path: str, container_path: str) -> "fmt.BindMount":
    """What a restore needs to know of a bind mount's source: file or directory, and its mode."""
    try:
        st = os.stat(host_path)
        file_type, permissions = ("directory" if stat.S_ISDIR(st.st_mode) else "file"), stat.S_IMODE(st.st_mode)
    except OSError:
        file_type, permissions = "directory", 0o755
    return fmt.BindMount(source=host_path, destination=container_path, file_type=file_type, permissions=permissions)


def diff_exclusions(mount_destinations: list[str]) -> list[str]:
    """Volumes and node-managed files are not the container's own state: keep them out of the diff."""
    return sorted(set(NODE_MANAGED_PATHS) | {d for d in mount_destinations if d})
