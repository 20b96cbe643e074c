"""CheckpointPod's engine: one consistent cut of several containers of a pod.

Every selected container is frozen (cgroup freezer, `runc pause`) before any is dumped; CRIU then
dumps them side by side, one thread each, with --leave-running, and takes each writable-layer diff;
all are thawed before anything else happens -- on success, on error and past the deadline. Only then
are the parts packed (containers/<n>.tar, the ordinary container archive format) and the manifest
written (criu_glue.pod_checkpoint). Packing runs after the thaw: the frozen window is CRIU's dumps
and the diffs only.

Crash safety: an intent (Operation.CHECKPOINT_POD) naming the containers, the work directories and
the output files is written before the first freeze. If the daemon dies while they are frozen,
recover_pod_checkpoints() at start-up thaws whatever is still paused and removes the partial
output, so the pod is never left frozen and the caller's directory is empty again.

On error every file this call wrote into the output directory is removed; the directory itself,
which belongs to the caller, never is.

Stop mode (`stop=True`: gRPC metadata `pyshim-checkpoint-mode: stop`, sent by `pyshim migrate --pod`
and `pyshim node checkpoint-all`, never by kubelet): the containers stay frozen until every part and
the manifest are complete, then their TCP connections are locked and they are killed while still
frozen, so that no process runs on after its image was taken (its restored copy would repeat what it
did meanwhile). Any failure before the kill thaws them all and removes the output, as in the normal
mode. The intent's step "kill" tells recovery that the output is complete: it is kept, and the
containers a killed daemon had not killed yet run on, thawed, their locks lifted.
"""
from __future__ import annotations

import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from criu_glue import archive_format as fmt
from criu_glue import pod_checkpoint as podfmt
from criu_glue.criu import has_established_tcp
from oci.tree_removal import remove_tree
from pyshim.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from pyshim.checkpoint_restore import tcp_lock
from pyshim.internal import cgroups, crashpoints, mounts
from pyshim.checkpoint_restore.checkpoint import (ArchiveMembers, Checkpointer, StoppedByCheckpoint,
                                                  _write_archive_by_deadline)
from pyshim.checkpoint_restore.records import CheckpointFacts
from pyshim.internal.intents import IntentJournal, Operation
from pyshim.internal.phases import PhaseTimer
from pyshim.internal.runc import Runc, RuncError
from pyshim.internal.state import ContainerRecord, ContainerState

log = logging.getLogger(__name__)

COMPRESSIONS = ("none", "gzip", "zstd")
# CheckpointPod's `options` keys (documented in the README): anything else is refused.
OPTION_COMPRESSION = "compression"
OPTION_TCP = "tcp"
KNOWN_OPTIONS = (OPTION_COMPRESSION, OPTION_TCP)


@dataclass(frozen=True)
class PodCheckpointOptions:
    compression: str = "none"  # parts uncompressed by default: restore reads them at disk speed
    tcp: str = "auto"

    @classmethod
    def parse(cls, options: dict[str, str]) -> "PodCheckpointOptions":
        unknown = sorted(set(options) - set(KNOWN_OPTIONS))
        if unknown:
            raise InvalidArgument(f"CheckpointPod options {unknown} are not supported; pyshim knows "
                                  f"{list(KNOWN_OPTIONS)}")
        compression = options.get(OPTION_COMPRESSION, cls.compression)
        if compression not in COMPRESSIONS:
            raise InvalidArgument(f"CheckpointPod option {OPTION_COMPRESSION}={compression!r}: want one of {COMPRESSIONS}")
        tcp = options.get(OPTION_TCP, cls.tcp)
        if tcp not in podfmt.TCP_POLICIES:
            raise InvalidArgument(f"CheckpointPod option {OPTION_TCP}={tcp!r}: want one of {podfmt.TCP_POLICIES}")
        return cls(compression=compression, tcp=tcp)


@dataclass
class PodPart:
    """One selected container, with everything its archive needs, gathered before the freeze."""
    record: ContainerRecord
    name: str
    config_doc: dict
    members: ArchiveMembers


@dataclass(frozen=True)
class PodCheckpointResult:
    manifest: podfmt.PodManifest
    frozen_seconds: float
    total_seconds: float
    stopped: bool
    phases_ms: dict
    tcp: dict  # container id -> whether CRIU dumped its established connections


@dataclass
class _Work:
    part: PodPart
    index: int
    directory: Path
    lower_dirs: list
    tcp: bool = False
    connections: tuple = ()
    deleted: list | None = None
    error: Exception | None = None


def validate_output_dir(output_path: str) -> Path:
    if not output_path:
        raise InvalidArgument("CheckpointPod: output_path is empty: give an existing, empty directory")
    path = Path(output_path)
    if not path.is_absolute():
        raise InvalidArgument(f"CheckpointPod: output_path {output_path!r} is not an absolute path")
    if path.is_symlink() or not path.is_dir():
        raise InvalidArgument(f"CheckpointPod: output_path {output_path!r} is not an existing directory")
    if any(path.iterdir()):
        raise InvalidArgument(f"CheckpointPod: output_path {output_path!r} is not empty")
    return path


def validate_selection(sandbox_id: str, container_ids: list[str], find) -> list[ContainerRecord]:
    """The selected containers, each running and in the pod; `find(id)` returns a record or None."""
    if not container_ids:
        raise InvalidArgument("CheckpointPod: container_ids is empty: name the running containers to checkpoint")
    duplicates = sorted({c for c in container_ids if container_ids.count(c) > 1})
    if duplicates:
        raise InvalidArgument(f"CheckpointPod: container_ids lists {duplicates} more than once")
    records = []
    for cid in container_ids:
        record = find(cid)
        if record is None or record.sandbox_id != sandbox_id:
            raise InvalidArgument(f"CheckpointPod: container {cid!r} is not in pod sandbox {sandbox_id}")
        if record.state != ContainerState.RUNNING:
            raise FailedPrecondition(f"CheckpointPod: container {cid} is {record.state.value}: only running "
                                     "containers can be checkpointed")
        records.append(record)
    return records


class PodCheckpointer:
    def __init__(self, checkpointer: Checkpointer, runc: Runc, journal: IntentJournal, work_root: Path):
        self._checkpointer = checkpointer
        self._runc = runc
        self._journal = journal
        self._work_root = Path(work_root)
        self._work_root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def recover(self) -> list[StoppedByCheckpoint]:
        """Start-up repair (pyshim/internal/recovery.py): thaw what an interrupted CheckpointPod froze.
        Returns the containers a stop-mode CheckpointPod may have killed once its output was complete:
        recovery records them as stopped by it when their exit is found (as for CheckpointContainer)."""
        stopped: list[StoppedByCheckpoint] = []
        recover_pod_checkpoints(self._journal, self._runc, stopped)
        return stopped

    def checkpoint(self, sandbox_id: str, pod_config_doc: dict, pod_ips: list[str], parts: list[PodPart],
                   output: Path, options: PodCheckpointOptions, deadline: float, stop: bool = False,
                   netns_path: str = "") -> PodCheckpointResult:
        """Checkpoint `parts` into `output` (an existing empty directory) at one instant; with `stop`,
        kill them once the checkpoint is complete (their connections locked in `netns_path` first)."""
        self._checkpointer.check_enabled()
        locks = [self._checkpointer._lock_for(p.record.id) for p in sorted(parts, key=lambda p: p.record.id)]
        taken = []
        try:
            for lock in locks:  # in id order: two pod checkpoints sharing a container never deadlock
                if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    raise DeadlineExceeded("CheckpointPod: a selected container is being checkpointed by another "
                                           "call; gave up waiting")
                taken.append(lock)
            for p in parts:
                if p.record.state != ContainerState.RUNNING:
                    raise FailedPrecondition(f"CheckpointPod: container {p.record.id} is {p.record.state.value}")
            return self._checkpoint_locked(sandbox_id, pod_config_doc, pod_ips, parts, output, options, deadline,
                                           stop, netns_path)
        finally:
            for lock in taken:
                lock.release()

    def _checkpoint_locked(self, sandbox_id, pod_config_doc, pod_ips, parts, output: Path,
                           options: PodCheckpointOptions, deadline: float, stop: bool,
                           netns_path: str) -> PodCheckpointResult:
        started = time.monotonic()
        phases = PhaseTimer()
        works: list[_Work] = []
        written = [output / podfmt.part_name(i) for i in range(len(parts))] + [output / podfmt.MANIFEST]
        intent = None
        killed = False
        manifest = None

        def write_output() -> None:
            nonlocal manifest
            (output / podfmt.PARTS_DIR).mkdir(mode=0o700, exist_ok=True)
            self._package_all(works, output, options, deadline)
            phases.mark("archives")
            manifest = _manifest(sandbox_id, pod_config_doc, pod_ips, options, works)
            _check_deadline(deadline, "CheckpointPod ran out of time before the manifest was written")
            podfmt.write_manifest(output, manifest)
            phases.mark("manifest")

        def write_output_and_kill() -> None:  # stop mode: all of it while frozen
            nonlocal killed
            self._journal.advance(intent, "archive")
            write_output()
            self._journal.advance(intent, "kill")
            killed = True  # from here on the output is complete and is kept whatever happens
            self._kill_all_frozen(works, netns_path)
            phases.mark("kill")

        try:
            for i, p in enumerate(parts):
                # Read before freezing: the frozen window is for CRIU and the diffs only.
                work = _Work(p, i, Path(tempfile.mkdtemp(prefix=f"pod-{p.record.id[:12]}-", dir=self._work_root)),
                             mounts.overlay_lower_dirs(p.record.rootfs))
                (work.directory / fmt.CHECKPOINT_DIR).mkdir()
                works.append(work)
            intent = self._journal.begin(
                Operation.CHECKPOINT_POD, sandbox_id, step="freezing",
                containers=",".join(p.record.id for p in parts), output_files="\n".join(map(str, written)),
                work_dirs="\n".join(str(w.directory) for w in works), netns_path=netns_path,
                mode="stop" if stop else "leave-running")
            phases.mark("prepare")
            frozen = self._freeze_dump_thaw(works, options, deadline, phases, intent,
                                            write_output_and_kill if stop else None, netns_path)
            if not stop:
                write_output()  # after the thaw: packing is not frozen time
        except BaseException:
            if not killed:
                _remove_outputs(output, written)
            raise
        finally:
            for w in works:
                remove_tree(w.directory, ignore_errors=True)
            if intent is not None:
                self._journal.finish(intent)
        total = time.monotonic() - started
        log.info("pod checkpointed", extra={
            "sandbox": sandbox_id, "containers": [p.record.id for p in parts], "output": str(output),
            "frozen_ms": round(frozen * 1000, 1), "total_ms": round(total * 1000, 1), "stopped": stop,
            "phases_ms": phases.report()})
        return PodCheckpointResult(manifest, frozen, total, stop, phases.report(),
                                   {w.part.record.id: w.tcp for w in works})

    def _freeze_dump_thaw(self, works: list[_Work], options, deadline: float, phases: PhaseTimer, intent,
                          while_frozen=None, netns_path: str = "") -> float:
        """Pause all, dump all side by side, run `while_frozen` if every dump succeeded, thaw all --
        the thaw whatever happened. Returns the frozen time."""
        for w in works:
            w.connections = tuple(_connections_of(w.part.record))
            w.tcp = self._wants_tcp(w, options)
        paused: list[_Work] = []
        frozen_at = time.monotonic()
        try:
            # All freezes at once: the cut is as close to one instant as `runc pause` allows.
            with ThreadPoolExecutor(max_workers=len(works), thread_name_prefix="pod-freeze") as pool:
                outcomes = [(w, pool.submit(self._runc.pause, w.part.record.id)) for w in works]
                errors = []
                for w, future in outcomes:
                    error = future.exception()
                    if error is None:
                        paused.append(w)
                    else:
                        errors.append((w, error))
            if errors:
                w, e = errors[0]
                raise FailedPrecondition(f"CheckpointPod: cannot freeze container {w.part.record.id}: "
                                         f"{getattr(e, 'message', e)}")
            frozen_at = time.monotonic()
            # No journal write here: recovery does for "frozen" what it does for "freezing" (thaw all,
            # empty the output), and an fsync would only lengthen the frozen window. The crash point stays.
            crashpoints.reached(f"{Operation.CHECKPOINT_POD.value}:frozen")
            phases.mark("pause")
            with ThreadPoolExecutor(max_workers=len(works), thread_name_prefix="pod-dump") as pool:
                for w, future in [(w, pool.submit(self._dump_one, w, deadline, netns_path)) for w in works]:
                    try:
                        w.deleted = future.result()
                    except Exception as e:  # noqa: BLE001 - reported below, after every dump ended
                        w.error = e
            phases.mark("dump")
            if while_frozen is not None and not any(w.error for w in works):
                while_frozen()
        finally:
            thaw_errors = self._thaw_all(paused)
            frozen = time.monotonic() - frozen_at
            phases.mark("resume")
        self._journal.advance(intent, "thawed")
        failed = [w for w in works if w.error is not None]
        if failed:
            raise _first_error(failed)
        if thaw_errors:
            raise thaw_errors[0]
        return frozen

    def _kill_all_frozen(self, works: list[_Work], netns_path: str) -> None:
        """Stop mode: lock every container's connections (peers see no FIN or RST), then SIGKILL them
        all while frozen; the thaw that follows lets them die at once. A lock failure kills nothing."""
        locked = []
        try:
            for w in works:
                connections = _live_connections(w.part.record)
                if netns_path and connections:
                    tcp_lock.lock(netns_path, w.part.record.id, connections)
                    locked.append(w.part.record.id)
        except tcp_lock.LockError as e:
            for cid in locked:
                tcp_lock.unlock_all(netns_path, cid)
            raise FailedPrecondition(f"CheckpointPod: cannot lock the TCP connections before stopping the pod's "
                                     f"containers: {e}; they run on") from None
        failed = []
        for w in works:
            try:
                self._runc.kill(w.part.record.id, "KILL", all_processes=True)
            except RuncError as e:
                failed.append(f"{w.part.record.id}: {e.message}")
        if failed:
            raise FailedPrecondition(f"CheckpointPod: the checkpoint is complete, but these containers could not be "
                                     f"stopped: {'; '.join(failed)}")

    def _dump_one(self, w: _Work, deadline: float, netns_path: str) -> list[str]:
        return self._checkpointer._dump_and_diff(w.part.record, w.directory, w.part.members, w.lower_dirs, w.tcp,
                                                 deadline, PhaseTimer(), netns_path)

    def _thaw_all(self, paused: list[_Work]) -> list[Exception]:
        """Side by side, as the freezes: the last container is not kept frozen for the others' `runc resume`."""
        def thaw(w: _Work) -> Exception | None:
            try:
                self._checkpointer._thaw(w.part.record)
                return None
            except RuncError as e:
                return FailedPrecondition(f"CheckpointPod: container {w.part.record.id} could not be thawed: "
                                          f"{e.message}")

        if len(paused) <= 1:
            return [e for e in map(thaw, paused) if e is not None]
        with ThreadPoolExecutor(max_workers=len(paused), thread_name_prefix="pod-thaw") as pool:
            return [e for e in pool.map(thaw, paused) if e is not None]

    def _wants_tcp(self, w: _Work, options: PodCheckpointOptions) -> bool:
        # "close" still dumps the connections (CRIU refuses established sockets otherwise); RestorePod
        # restores them closed.
        if options.tcp in ("established", "close"):
            return True
        return bool(w.connections) or (bool(w.part.record.pid) and has_established_tcp(w.part.record.pid))

    def _package_all(self, works: list[_Work], output: Path, options: PodCheckpointOptions, deadline: float) -> None:
        """The parts, packed side by side (after the thaw: this is not frozen time)."""
        def package(w: _Work) -> None:
            w.part.members.write(w.directory, w.deleted or [])
            Checkpointer._move_criu_outputs(w.directory)
            part = output / podfmt.part_name(w.index)
            # The temporary name _remove_outputs and the start-up recovery look for.
            _write_archive_by_deadline(part, part.with_name(f".{part.name}.tmp"), w.directory,
                                       options.compression, deadline, f"checkpoint of {w.part.record.id}")

        with ThreadPoolExecutor(max_workers=len(works), thread_name_prefix="pod-pack") as pool:
            futures = [pool.submit(package, w) for w in works]
            errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e


def _manifest(sandbox_id, pod_config_doc, pod_ips, options, works: list[_Work]) -> podfmt.PodManifest:
    return podfmt.PodManifest(
        pod_id=sandbox_id, pod_config=pod_config_doc, pod_ips=tuple(pod_ips), tcp=options.tcp,
        containers=tuple(podfmt.PodContainer(
            index=w.index, name=w.part.name, id=w.part.record.id, config=w.part.config_doc,
            tcp_connections=w.connections) for w in works),
        checkpointed_time_ns=time.time_ns())


def _live_connections(record: ContainerRecord) -> list:
    if not record.cgroups_path:
        return []
    try:
        return tcp_lock.established_connections(cgroups.processes(record.cgroups_path))
    except OSError:
        return []


def _connections_of(record: ContainerRecord) -> list[podfmt.TcpConnection]:
    try:
        pids = cgroups.processes(record.cgroups_path) if record.cgroups_path else ([record.pid] if record.pid else [])
        return [podfmt.TcpConnection(c.local, c.local_port, c.peer, c.peer_port)
                for c in tcp_lock.established_connections(pids)]
    except OSError:
        return []


def _first_error(failed: list[_Work]) -> Exception:
    """The first failing container's error, naming it (the checkpointer's messages carry CRIU's log)."""
    first = failed[0]
    others = [w.part.record.id for w in failed[1:]]
    error = first.error
    if others and hasattr(error, "message"):
        error.message = f"{error.message}\n(also failed: {', '.join(others)})"
        error.args = (error.message,)
    return error


def _remove_outputs(output: Path, written: list[Path]) -> None:
    for path in written:
        path.unlink(missing_ok=True)
        path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)
    parts = output / podfmt.PARTS_DIR
    if parts.is_dir():
        for leftover in parts.iterdir():  # temporary archives of write_archive
            if leftover.name.startswith("."):
                leftover.unlink(missing_ok=True)
        try:
            parts.rmdir()
        except OSError:
            log.error("pod checkpoint: cannot empty the output directory", extra={"dir": str(parts)})


def _check_deadline(deadline: float, message: str) -> None:
    if time.monotonic() >= deadline:
        raise DeadlineExceeded(message)


def recover_pod_checkpoints(journal: IntentJournal, runc: Runc,
                            stopped: list[StoppedByCheckpoint] | None = None) -> list[str]:
    """Start-up repair of CheckpointPod calls a killed daemon left open: thaw every container they
    froze, remove their partial output and work directories. Returns the ids thawed; adds to `stopped`
    every container of a stop-mode call cut at its kill step (those that exited ended by it)."""
    thawed = []
    for intent in journal.pending():
        if intent.operation != Operation.CHECKPOINT_POD:
            continue
        for cid in filter(None, intent.facts.get("containers", "").split(",")):
            try:
                state = runc.state(cid)
                if state is not None and state.status == "paused":
                    runc.resume(cid)
                    thawed.append(cid)
            except RuncError as e:
                log.error("interrupted pod checkpoint: cannot thaw container",
                          extra={"container": cid, "error": e.message, "intent": intent.id})
                continue
        files = [Path(p) for p in intent.facts.get("output_files", "").split("\n") if p]
        if intent.step == "kill":
            # A stopping checkpoint killed at its last step: the output is complete and consistent (taken
            # frozen, nothing ran since), so it is kept. The caller was never told it succeeded, so the
            # containers not killed yet run on, their connections unlocked; a retry checkpoints afresh.
            _unlock_survivors(intent, runc)
            if stopped is not None:
                stopped.extend(_stopped_by(intent, files))
            files = []
        if files:
            _remove_outputs(files[0].parent.parent if files[0].parent.name == podfmt.PARTS_DIR
                            else files[0].parent, files)
        for d in filter(None, intent.facts.get("work_dirs", "").split("\n")):
            remove_tree(d, ignore_errors=True)
        journal.finish(intent)
        log.warning("interrupted pod checkpoint recovered", extra={"sandbox": intent.target, "thawed": thawed,
                                                                   "intent": intent.id})
    return thawed


def _stopped_by(intent, files: list[Path]) -> list[StoppedByCheckpoint]:
    """Container i's part is output_files[i] (the intent names both in the parts' order)."""
    ids = [c for c in intent.facts.get("containers", "").split(",") if c]
    found = []
    for cid, part in zip(ids, files):
        when = part.stat().st_mtime_ns if part.exists() else time.time_ns()
        found.append(StoppedByCheckpoint(cid, CheckpointFacts(location=str(part), time_ns=when, stopped=True)))
    return found


def _unlock_survivors(intent, runc: Runc) -> None:
    netns_path = intent.facts.get("netns_path", "")
    if not netns_path:
        return
    for cid in filter(None, intent.facts.get("containers", "").split(",")):
        try:
            state = runc.state(cid)
            if state is not None and state.status in ("running", "paused"):
                tcp_lock.unlock_all(netns_path, cid)
        except Exception:  # noqa: BLE001 - the pod's netns may be gone with the pod
            log.warning("interrupted pod checkpoint: cannot unlock a container's connections",
                        extra={"container": cid, "intent": intent.id})
