"""Container lifecycle: rootfs, OCI config, conmon + runc, exit tracking, and the durable records.

Every operation that can fail midway undoes what it did (an ExitStack of undo steps), so a failed
CreateContainer leaves no mount, runc container, directory or record behind.

A daemon killed midway runs no undo step: each operation first writes its intent (the intent journal,
pyshim/internal/intents.py) naming what it will make, and `recover` repairs what the intents and the
machine (runc's state dir, conmon pid files, container dirs) say at start-up, before the socket is
served. A container's status (state, pid, times, exit) changes only through `update_status`, under
the container's lock, so that each transition, and its event, happens exactly once.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from cri_api import api_pb2 as cri
from oci.runtime_spec import (ContainerSpecInput, SpecInputError, build_container_spec, linux_resources_from_cri,
                              validate_container_config)
from oci.spec_schema import InvalidSpec, validate_spec
from oci.tree_removal import remove_tree
from pyshim.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from pyshim.internal import cgroups, crashpoints, mounts, procs, request_paths
from pyshim.checkpoint_restore.checkpoint import CheckpointResult
from pyshim.checkpoint_restore import post_dump_hook
from pyshim.checkpoint_restore.records import CheckpointFacts
from pyshim.internal.conmon import Conmon, MonitorPaths
from pyshim.internal.host_caps import can_lower_oom_score_adj, recursive_read_only_mounts
from pyshim.internal.intents import Intent, IntentJournal, Operation
from pyshim.internal.phases import PhaseTimer
from pyshim.internal.events import ContainerEvent, EventBus, EventType
from pyshim.internal.runc import ExecResult, Runc, RuncError
from pyshim.internal.sysctls import normalize_sysctl_name
from pyshim.internal.state import (ContainerMetadata, ContainerRecord, ContainerState, ContainerStatus, RecordStore,
                                   SandboxRecord, decode_config, encode_config)

log = logging.getLogger(__name__)

# Exit code we report when a container vanished without conmon recording one (e.g. host reboot).
UNKNOWN_EXIT_CODE = 255


@dataclass(frozen=True)
class SandboxContext:
    """What a container needs of its pod, handed in by the caller (the container layer never looks pods up)."""
    record: SandboxRecord
    config: "cri.PodSandboxConfig"
    namespaces: dict[str, str | None]
    files: dict[str, str]


def _cgroups_path_in(config_json: Path) -> str:
    """The cgroup a container's config.json put it in ("" if unreadable)."""
    try:
        return str(json.loads(config_json.read_text()).get("linux", {}).get("cgroupsPath", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _with_checkpoint(status: ContainerStatus, facts: CheckpointFacts) -> ContainerStatus:
    """A status that records a finished checkpoint; a stopping one's exit is the checkpoint's."""
    if facts.stopped and status.state == ContainerState.EXITED:
        # Not an error and not a completion: kubelet and people should see why it ended.
        return replace(status, last_checkpoint=facts, reason="Checkpointed",
                       message=f"stopped after a checkpoint to {facts.location}")
    return replace(status, last_checkpoint=facts)


def container_name_key(config, sandbox_config) -> str:
    m, p = config.metadata, sandbox_config.metadata
    return f"k8s_{m.name}_{p.name}_{p.namespace}_{p.uid}_{m.attempt}"


class ContainerManager:
    def __init__(self, root: Path, state_dir: Path, runc: Runc, conmon: Conmon, image_store, events: EventBus,
                 intents: IntentJournal | None = None):
        self._root = Path(root) / "containers"
        self._records = RecordStore(Path(root) / "state" / "containers", ContainerRecord)
        self._exit_dir = Path(state_dir) / "exits"
        self._attach_dir = Path(state_dir) / "attach"
        for d in (self._root, self._exit_dir, self._attach_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._runc = runc
        self._conmon = conmon
        self._images = image_store
        self._events = events
        self._intents = intents if intents is not None else IntentJournal(Path(root) / "state" / "intents")
        self._names: dict[str, str] = {}
        self._lock = threading.RLock()
        # Re-entrant: a status update (refresh) happens inside operations that hold the lock (stop, remove).
        self._container_locks: dict[str, threading.RLock] = {}
        # Until the server serves, exits are recorded but their STOPPED events wait (publish_pending_stops).
        self._serving = False
        # Called with each record being removed, once its processes are dead and before its dir goes
        # (the restore engine ends a lazy restore's page source there).
        self._remove_hooks: list = []

    # ---- bookkeeping -------------------------------------------------------------------------

    def load(self) -> None:
        """Read the records back after a restart; `recover` then brings them up to date with reality."""
        self._records.load()
        for record in self._records.all():
            self._names[record.name] = record.id  # records keep the full reservation key

    def on_remove(self, hook) -> None:
        """`hook(record)` runs at every removal, after runc delete and before the container's dir goes."""
        self._remove_hooks.append(hook)

    def lock_for(self, container_id: str) -> threading.RLock:
        with self._lock:
            return self._container_locks.setdefault(container_id, threading.RLock())

    def update_status(self, record: ContainerRecord,
                      change: Callable[[ContainerStatus], ContainerStatus | None]) -> bool:
        """The one way a container's status changes: `change(status)` returns the new status (a
        dataclasses.replace of the one given), or None when the transition no longer applies (another
        thread made it first). Runs under the container's lock; the new status is saved atomically
        before the record holds it, so a failed save changes nothing. Callers publish an event only
        when this returns True."""
        with self.lock_for(record.id):
            if self._records.get(record.id) is not record:
                return False  # removed meanwhile (or a stale copy)
            status = change(record.status)
            if status is None:
                return False
            self._records.replace_status(record, status)
            return True

    def container_dir(self, container_id: str) -> Path:
        return self._root / container_id

    def add(self, record: ContainerRecord) -> None:
        """Save a new container's record, its name already reserved (reserve_name): from now on it exists.
        Never over a stored one: a stored record's status changes only through update_status."""
        with self._lock:
            if self._records.get(record.id) is not None:
                raise AlreadyExists(f"container {record.id} is already recorded")
            self._records.save(record)

    def paths(self, record: ContainerRecord) -> MonitorPaths:
        return MonitorPaths(bundle=record.bundle, exit_dir=self._exit_dir,
                            persist_dir=record.bundle / "persist", attach_dir=self._attach_dir)

    def get(self, container_id: str) -> ContainerRecord:
        record = self._records.resolve(container_id)
        if record is None:
            raise NotFound(f"container {container_id!r} not found")
        return self.refresh(record)

    def recorded(self, container_id: str) -> ContainerRecord | None:
        """The record saved under exactly this id, as saved (recovery: nothing is refreshed yet)."""
        return self._records.get(container_id)

    def find(self, container_id: str) -> ContainerRecord | None:
        record = self._records.resolve(container_id)
        return self.refresh(record) if record else None

    def all(self) -> list[ContainerRecord]:
        return [self.refresh(r) for r in self._records.all()]

    def in_sandbox(self, sandbox_id: str) -> list[ContainerRecord]:
        return [r for r in self.all() if r.sandbox_id == sandbox_id]

    def image_in_use(self, image_id: str) -> list[str]:
        return [r.id for r in self._records.all() if image_id in (r.image_id, r.base_image_id)]

    def config_of(self, record: ContainerRecord):
        return decode_config(record, cri.ContainerConfig)

    def spec_of(self, record: ContainerRecord) -> dict:
        """The OCI config the container runs with (updated by UpdateContainerResources)."""
        return json.loads((record.bundle / "config.json").read_text())

    def note_checkpoint(self, container_id: str, result: CheckpointResult) -> None:
        """Record a finished checkpoint; a stopping one also records the container's end."""
        record = self.get(container_id)
        with self.lock_for(record.id):
            if result.stopped:
                self._wait_exit(record, 30)

            facts = CheckpointFacts(
                location=str(result.location), time_ns=time.time_ns(),
                frozen_ms=round(result.frozen_seconds * 1000, 1), total_ms=round(result.total_seconds * 1000, 1),
                archive_bytes=result.archive_bytes, tcp_established=result.tcp_established,
                stopped=result.stopped, phases_ms=result.phases_ms, archive=result.archive_digest)
            self.update_status(record, lambda s: _with_checkpoint(s, facts))

    def note_stopped_by_checkpoint(self, container_id: str, facts: CheckpointFacts) -> None:
        """Start-up: a stopping checkpoint killed this container and the daemon died before
        note_checkpoint. Recovery has recorded the exit (SIGKILL, "Error"); say it was the checkpoint."""
        record = self._records.get(container_id)
        if record is not None:
            self.update_status(record, lambda s: _with_checkpoint(s, facts) if s.state == ContainerState.EXITED
                               else None)

    # ---- exit tracking -----------------------------------------------------------------------

    def refresh(self, record: ContainerRecord) -> ContainerRecord:
        """Notice that a running container exited (conmon wrote its exit file)."""
        if record.state != ContainerState.RUNNING:
            return record
        exited = Conmon.exit_code(self.paths(record), record.id)
        if exited is None:
            return record
        code, when = exited
        self.mark_exited(record, code, int(when * 1e9))
        return record

    def mark_exited(self, record: ContainerRecord, code: int, finished_at_ns: int, reason: str = "",
                     message: str | None = None) -> bool:
        """RUNNING/CREATED -> EXITED, once: the exit watcher and request threads may all notice the
        same exit; only the one whose transition happened publishes STOPPED."""
        oom_file = record.bundle / "persist" / "oom"

        def to_exited(s: ContainerStatus) -> ContainerStatus | None:
            if s.state == ContainerState.EXITED:
                return None
            oom = oom_file.exists()
            return replace(
                s, state=ContainerState.EXITED, exit_code=code, pid=0,
                # conmon's exit-file time and our start stamp come from two clocks reads apart: a process
                # that exits at once may seem to end before it started.
                finished_at=max(finished_at_ns, s.started_at),
                reason=reason or ("OOMKilled" if oom else "Completed" if code == 0 else "Error"),
                message=s.message if message is None else message,
                # Saved unsent, marked sent once published (_publish_stop): a daemon killed in between
                # sends it again after its restart (publish_pending_stops) rather than never.
                stopped_event_sent=False)
        with self.lock_for(record.id):
            if not self.update_status(record, to_exited):
                return False
            # Read under the lock that publish_pending_stops takes for each record after setting it:
            # either this publishes, or that does, never neither (and never both).
            if self._serving:
                self._publish_stop(record)
        return True

    def _publish_stop(self, record: ContainerRecord) -> None:
        """STOPPED for a recorded exit, then the record marked sent; the caller holds the container's
        lock, so that no other thread publishes the same exit meanwhile."""
        crashpoints.reached("container_exit:publish")
        self.publish(record, EventType.STOPPED)
        crashpoints.reached("container_exit:mark_sent")
        self.update_status(record, lambda s: None if s.stopped_event_sent else replace(s, stopped_event_sent=True))

    def publish_pending_stops(self) -> None:
        """Once the server serves: STOPPED for every container whose exit was recorded but not yet
        published (it ended while the daemon was down, or the daemon was killed before publishing).
        At least once across restarts: a daemon killed between a publish and its mark sends it twice."""
        self._serving = True
        for record in self._records.all():
            with self.lock_for(record.id):
                if (self._records.get(record.id) is record and record.state == ContainerState.EXITED
                        and not record.stopped_event_sent):
                    self._publish_stop(record)

    def _reconcile(self, record: ContainerRecord, states: dict | None = None) -> None:
        """Bring one record up to date with what runc and conmon say (start-up only); `states` is
        runc's state of every container, None to ask runc for this one."""
        if record.state not in (ContainerState.RUNNING, ContainerState.CREATED) or record.pending_restore:
            return
        exited = Conmon.exit_code(self.paths(record), record.id)
        if exited is not None:
            self.mark_exited(record, exited[0], int(exited[1] * 1e9))
            return
        state = states.get(record.id) if states is not None else self._runc.state(record.id)
        if state is None or state.status == "stopped":
            # The container is gone and nobody recorded its end (the host restarted, or runc state was wiped).
            log.warning("recovery: container gone without an exit record; marked exited",
                        extra={"container": record.id, "recorded": record.state.value})
            self.mark_exited(record, UNKNOWN_EXIT_CODE, time.time_ns(), reason="Unknown",
                              message="container was gone when the daemon restarted")
        elif record.state == ContainerState.CREATED and state.status in ("running", "paused"):
            # StartContainer was killed between `runc start` and saving the record: it runs, say so.
            started = procs.start_time_ns(state.pid) or time.time_ns()

            def to_running(s: ContainerStatus) -> ContainerStatus | None:
                if s.state != ContainerState.CREATED:
                    return None
                return replace(s, state=ContainerState.RUNNING, pid=state.pid, started_at=started)
            if self.update_status(record, to_running):
                log.warning("recovery: container recorded CREATED is running (start interrupted); "
                            "recorded it RUNNING", extra={"container": record.id, "pid": state.pid})
                self.publish(record, EventType.STARTED)

    def poll_exits(self) -> None:
        """Called periodically: publishes STOPPED events promptly even if nobody asks for status."""
        for record in self._records.all():
            if record.state == ContainerState.RUNNING:
                self.refresh(record)

    def publish(self, record: ContainerRecord, kind: EventType) -> None:
        self._events.publish(ContainerEvent(record.id, record.sandbox_id, kind, time.time_ns()))

    # ---- create ------------------------------------------------------------------------------

    def create(self, sandbox: SandboxContext, config) -> ContainerRecord:
        try:
            validate_container_config(config)
        except SpecInputError as e:
            raise InvalidArgument(str(e)) from None
        image = self._images.get(config.image.image) if config.image.image else None
        if image is None:
            raise NotFound(f"image {config.image.image!r} not found: pull it first")
        with self.reserve_name(config, sandbox) as (container_id, key):
            return self._create_reserved(container_id, key, sandbox, config, image)

    @contextlib.contextmanager
    def reserve_name(self, config, sandbox: SandboxContext, container_id: str = ""):
        """An id (a fresh one, or one the caller journaled first: RestorePod) and the container's name
        reserved for it; the name is freed if creating fails."""
        key = container_name_key(config, sandbox.config)
        container_id = container_id or secrets.token_hex(32)
        with self._lock:
            if key in self._names:
                raise AlreadyExists(f"container name {key!r} is already in use by {self._names[key]}")
            self._names[key] = container_id
        try:
            yield container_id, key
        except BaseException:
            with self._lock:
                self._names.pop(key, None)
            raise

    def _create_reserved(self, container_id, key, sandbox: SandboxContext, config, image) -> ContainerRecord:
        cdir = self._root / container_id
        record = ContainerRecord(ContainerMetadata(
            id=container_id, sandbox_id=sandbox.record.id, name=key, attempt=config.metadata.attempt,
            config_b64=encode_config(config), image_ref=config.image.image, image_id=image.id,
            image_name=(image.repo_tags or image.repo_digests or [image.id])[0],
            created_at=time.time_ns(), dir=str(cdir), log_path=self.log_path_for(sandbox.config, config),
            cgroups_path=f"{sandbox.record.cgroup_parent.rstrip('/')}/{container_id}",
            stop_signal=image.config.stop_signal or "TERM",
        ))
        phases = PhaseTimer()
        # Everything below is found by the container's id (its dir, runc's state, conmon's pid file
        # in the dir, the cgroup named in config.json): the intent needs no more than that.
        with self._intents.track(Operation.CREATE_CONTAINER, container_id, dir=str(cdir),
                                 cgroups_path=record.cgroups_path) as intent:
            record = self._create_tracked(record, sandbox, config, image, phases, intent)
        self.publish(record, EventType.CREATED)
        log.info("container created", extra={"container": container_id, "sandbox": sandbox.record.id,
                                             "image": record.image_name, "ms": phases.report()})
        return record

    def _create_tracked(self, record: ContainerRecord, sandbox: SandboxContext, config, image,
                        phases: PhaseTimer, intent: Intent) -> ContainerRecord:
        """The container made and its record saved: the record returned is the one stored."""
        container_id, key, cdir = record.id, record.name, record.bundle
        with contextlib.ExitStack() as undo:
            cdir.mkdir(mode=0o700)
            undo.callback(remove_tree, cdir, ignore_errors=True)
            for sub in (record.upper, record.work, record.rootfs):
                sub.mkdir(mode=0o755)
            layers = self._images.layer_paths(image)
            crashpoints.reached("create_container:rootfs")
            mounts.mount_overlay(layers, record.upper, record.work, record.rootfs)
            undo.callback(mounts.unmount, record.rootfs)
            phases.mark("rootfs")

            spec = self.build_spec(record, sandbox, config, image)
            (cdir / "config.json").write_text(json.dumps(spec))
            if record.log_path:
                Path(record.log_path).parent.mkdir(parents=True, exist_ok=True)
            phases.mark("spec")

            # Before conmon starts: a create that fails or times out half-way leaves a runc state
            # dir, a `runc init` and the container's cgroups, which must go with it.
            undo.callback(self._discard_runc_container, record)
            crashpoints.reached("create_container:runc_create")
            pid = self._conmon.create(container_id, key, self.paths(record), record.log_path,
                                      stdin=config.stdin, stdin_once=config.stdin_once, tty=config.tty)
            phases.mark("runc_create")
            crashpoints.reached("create_container:record")
            record = ContainerRecord(record.metadata, ContainerStatus(pid=pid))  # not stored yet: a new one
            self.add(record)
            phases.mark("record")
            undo.pop_all()
        return record

    def _discard_runc_container(self, record: ContainerRecord) -> None:
        """Undo of a create: runc's container (state dir and processes) and its cgroups."""
        try:
            self._runc.delete(record.id, force=True)
        except RuncError as e:
            log.warning("cannot delete the runc container of a failed create",
                        extra={"container": record.id, "error": e.message})
        self._runc.discard_state_dir(record.id)
        cgroups.remove(record.cgroups_path)

    def build_spec(self, record, sandbox: SandboxContext, config, image) -> dict:
        # The pod's sysctls were validated at RunPodSandbox; runc wants them dot-separated.
        sysctls = {normalize_sysctl_name(k): v for k, v in sandbox.config.linux.sysctls.items()}
        inp = ContainerSpecInput(
            container_id=record.id, rootfs=str(record.rootfs), config=config,
            sandbox_config=sandbox.config, image_config=image.config,
            namespaces=sandbox.namespaces, hostname=sandbox.record.hostname,
            sandbox_files=sandbox.files, cgroups_path=record.cgroups_path,
            annotations={"io.kubernetes.cri.image-name": record.image_name,
                         "io.kubernetes.cri.sandbox-id": sandbox.record.id,
                         # runc gives CRIU this container's own configuration file: checkpoints use
                         # it to take the diff inside CRIU's freeze (post_dump_hook.py).
                         **post_dump_hook.spec_annotation(record.bundle)},
            sysctls=sysctls,
            recursive_read_only_supported=recursive_read_only_mounts(self._runc.mount_options),
        )
        try:
            spec = build_container_spec(inp)
            self._fit_oom_score_adj(spec, record)
            validate_spec(spec)
        except (SpecInputError, InvalidSpec) as e:
            raise InvalidArgument(f"container {config.metadata.name!r}: {e}") from None
        return spec

    @staticmethod
    def _fit_oom_score_adj(spec: dict, record: ContainerRecord) -> None:
        """kubelet asks -997 for Guaranteed pods. A host that withholds CAP_SYS_RESOURCE cannot grant a
        negative score, and runc would fail obscurely; run the container at 0 and say so instead."""
        wanted = spec.get("process", {}).get("oomScoreAdj", 0)
        if wanted < 0 and not can_lower_oom_score_adj():
            spec["process"]["oomScoreAdj"] = 0
            log.warning("negative oom_score_adj needs CAP_SYS_RESOURCE, which this host withholds; using 0",
                        extra={"container": record.id, "requested": wanted})

    @staticmethod
    def log_path_for(sandbox_config, config) -> str:
        return request_paths.container_log_path(sandbox_config.log_directory, config.log_path)

    # ---- start / stop ------------------------------------------------------------------------

    def start(self, container_id: str) -> ContainerRecord:
        record = self.get(container_id)
        if record.pending_restore:
            raise FailedPrecondition(f"container {record.id} restores from a checkpoint: start it with its pod and base image")
        with self.lock_for(record.id):
            if record.state != ContainerState.CREATED:
                raise FailedPrecondition(f"container {record.id} is {record.state.value}, not CREATED: cannot start it")
            # Killed after `runc start` and before the save, the record says CREATED while it runs:
            # recovery (_reconcile) reads runc's state and records the truth.
            with self._intents.track(Operation.START_CONTAINER, record.id):
                self._runc.start(record.id)
                crashpoints.reached("start_container:record")
                started = time.time_ns()

                def to_running(s: ContainerStatus) -> ContainerStatus | None:
                    if s.state != ContainerState.CREATED:
                        return None
                    return replace(s, state=ContainerState.RUNNING, started_at=started)
                changed = self.update_status(record, to_running)
        if changed:
            self.publish(record, EventType.STARTED)
        return self.refresh(record)

    def stop(self, container_id: str, timeout: float) -> None:
        """SIGTERM (or the image's stop signal), then SIGKILL when `timeout` seconds pass. Idempotent:
        stopping a stopped, removed or unknown container succeeds (CRI: stop and remove may be retried)."""
        record = self.find(container_id)
        if record is None:
            return
        with self.lock_for(record.id):
            if record.state == ContainerState.CREATED and record.pending_restore:
                # Nothing runs yet: the process comes to life only at StartContainer.
                self.mark_exited(record, 137, time.time_ns(), reason="Error")
                return
            if record.state == ContainerState.CREATED:
                # Never started: kill the runc init waiting in `runc create`, so conmon records an exit.
                self._runc.kill(record.id, "KILL")
                self._wait_exit(record, 10)
                if record.state != ContainerState.EXITED:
                    self.mark_exited(record, 137, time.time_ns(), reason="Error")
                return
            if record.state != ContainerState.RUNNING:
                return
            # No intent: what a stop changes (the process's life) recovery reads back from conmon and runc.
            crashpoints.reached("stop_container:kill")
            if timeout > 0:
                self._runc.kill(record.id, record.stop_signal)
                if self._wait_exit(record, timeout):
                    return
            self._runc.kill(record.id, "KILL", all_processes=True)
            if not self._wait_exit(record, 30):
                raise DeadlineExceeded(f"container {record.id} did not exit within 30s of SIGKILL")

    def _wait_exit(self, record: ContainerRecord, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            self.refresh(record)
            if record.state == ContainerState.EXITED:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    # ---- remove ------------------------------------------------------------------------------

    def remove(self, container_id: str) -> None:
        """Stop if needed, then remove every trace but the log. Removing a removed container succeeds."""
        record = self._records.resolve(container_id)
        if record is None:
            return
        with self.lock_for(record.id):
            if self._records.get(record.id) is not record:
                return  # a concurrent RemoveContainer did it (and sent the one DELETED event)
            # Killed midway, the intent makes recovery finish the removal: kubelet asked for it.
            with self._intents.track(Operation.REMOVE_CONTAINER, record.id, dir=record.dir,
                                     cgroups_path=record.cgroups_path):
                self._remove_locked(record)
        self.publish(record, EventType.DELETED)
        log.info("container removed", extra={"container": record.id})

    def _remove_locked(self, record: ContainerRecord) -> None:
        self.refresh(record)
        if record.state == ContainerState.RUNNING or (record.state == ContainerState.CREATED
                                                      and not record.pending_restore):
            self._runc.kill(record.id, "KILL", all_processes=True)
            self._wait_exit(record, 10)
        crashpoints.reached("remove_container:delete")
        self._runc.delete(record.id, force=True)
        for hook in self._remove_hooks:
            hook(record)
        mounts.unmount(record.rootfs)
        # Any depth: the writable layer may hold a tree planted by the container or an archive.
        remove_tree(record.dir, ignore_errors=True)
        for leftover in (self._exit_dir / record.id, self._attach_dir / record.id):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        crashpoints.reached("remove_container:record")
        self._records.delete(record.id)
        with self._lock:
            self._names.pop(record.name, None)
            self._container_locks.pop(record.id, None)

    # ---- recovery after a crash --------------------------------------------------------------

    def recover(self, intents: list[Intent]) -> None:
        """At start-up, before serving: finish or undo what a killed daemon left half-done, bring every
        record up to date with runc and conmon, and remove what no record owns. Idempotent.
        Restores cut short are the restore engine's (RestoreEngine.recover), repaired before this."""
        handlers = {Operation.CREATE_CONTAINER: self._recover_create,
                    Operation.START_CONTAINER: lambda intent: None,  # _reconcile reads runc's state
                    Operation.REMOVE_CONTAINER: self._recover_remove}
        for intent in intents:
            handler = handlers.get(intent.operation)
            if handler is not None:
                handler(intent)
                self._intents.finish(intent)
        # One `runc list` for all: a `runc state` per container costs ~10 ms each at start-up.
        try:
            states = self._runc.states()
        except (RuncError, ValueError):
            states = None  # a broken state dir breaks `runc list`: ask per container
        for record in self._records.all():
            self._reconcile(record, states)
        self._sweep_unowned()

    def _recover_create(self, intent: Intent) -> None:
        if self._records.get(intent.target) is not None:
            return  # the record was saved: the create finished, only the intent's close was lost
        log.warning("recovery: interrupted CreateContainer left a container with no record; removed it",
                    extra={"container": intent.target, "dir": intent.facts.get("dir", "")})
        self.remove_leftovers(intent.target, intent.facts.get("cgroups_path", ""))

    def _recover_remove(self, intent: Intent) -> None:
        record = self._records.get(intent.target)
        if record is not None:
            log.warning("recovery: interrupted RemoveContainer; finished removing the container",
                        extra={"container": record.id})
            self._remove_locked(record)
            self.publish(record, EventType.DELETED)
        else:
            self.remove_leftovers(intent.target, intent.facts.get("cgroups_path", ""))

    def kill_container_processes(self, container_id: str, conmon_pid: int) -> None:
        with contextlib.suppress(RuncError):
            self._runc.kill(container_id, "KILL", all_processes=True)
        with contextlib.suppress(RuncError):
            self._runc.delete(container_id, force=True)
        if procs.is_conmon_of(conmon_pid, container_id):
            procs.kill(conmon_pid)

    def remove_leftovers(self, container_id: str, cgroups_path: str) -> None:
        """Everything a container with no record may have left: runc container, conmon, mount, dir, cgroup."""
        cdir = self._root / container_id
        cgroups_path = cgroups_path or _cgroups_path_in(cdir / "config.json")
        self.kill_container_processes(container_id, procs.read_pidfile(cdir / "conmon.pid"))
        mounts.unmount(cdir / "rootfs")
        remove_tree(cdir, ignore_errors=True)
        for leftover in (self._exit_dir / container_id, self._attach_dir / container_id):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        if cgroups_path:
            cgroups.remove(cgroups_path)

    def _sweep_unowned(self) -> None:
        """runc containers and container dirs that no record owns (a CreateContainer killed before it
        wrote its intent's close, or debris from before the journal existed)."""
        known = {r.id for r in self._records.all()}
        # runc's state dir, not `runc list`: one broken state dir makes `runc list` fail for all.
        runc_ids = {p.name for p in self._runc.root.iterdir() if p.is_dir()} if self._runc.root.is_dir() else set()
        dir_ids = {p.name for p in self._root.iterdir()}
        for container_id in sorted((runc_ids | dir_ids) - known):
            log.warning("recovery: container with no record found; removed it (runc container, conmon, "
                        "rootfs mount, dir, cgroup)", extra={"container": container_id,
                                                            "runc": container_id in runc_ids})
            self.remove_leftovers(container_id, "")
        for directory in (self._exit_dir, self._attach_dir):
            for entry in directory.iterdir():
                if entry.name not in known:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()

    # ---- in-container operations -------------------------------------------------------------

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int) -> ExecResult:
        record = self.get(container_id)
        if record.state != ContainerState.RUNNING:
            raise FailedPrecondition(f"container {record.id} is {record.state.value}: exec needs a running container")
        if not cmd:
            raise InvalidArgument("exec command is empty")
        process = dict(self.spec_of(record)["process"], args=list(cmd), terminal=False)
        result = self._runc.exec_sync(record.id, process, timeout or None)
        if result.timed_out:
            raise DeadlineExceeded(f"command {cmd!r} timed out after {timeout}s")
        return result

    def update_resources(self, container_id: str, resources) -> None:
        record = self.get(container_id)
        if record.state not in (ContainerState.RUNNING, ContainerState.CREATED):
            raise FailedPrecondition(f"container {record.id} is {record.state.value}: cannot update its resources")
        wanted = linux_resources_from_cri(resources)
        self._runc.update(record.id, wanted)
        # Keep config.json in step: exec and checkpoints read the container's current limits from it.
        spec = self.spec_of(record)
        linux = spec.setdefault("linux", {})
        linux["resources"] = {**linux.get("resources", {}), **wanted}
        (record.bundle / "config.json").write_text(json.dumps(spec))

    def reopen_log(self, container_id: str, timeout: float) -> None:
        """Have conmon reopen the container's log; returns once the new log file is in place."""
        record = self.get(container_id)
        if record.state != ContainerState.RUNNING:
            raise FailedPrecondition(f"container {record.id} is not running: its log is closed")
        if not record.log_path:
            return  # conmon writes no CRI log: nothing to reopen
        Conmon.reopen_log(self.paths(record), Path(record.log_path), timeout)

    def usage(self, record: ContainerRecord) -> cgroups.Usage | None:
        return cgroups.usage(record.cgroups_path) if record.state == ContainerState.RUNNING else None

    def writable_layer_usage(self, record: ContainerRecord) -> tuple[int, int]:
        used = inodes = 0
        for dirpath, dirnames, filenames in os.walk(record.upper):
            for name in dirnames + filenames:
                inodes += 1
                with contextlib.suppress(OSError):
                    used += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
        return used, inodes

    def runc_mount_options(self) -> frozenset[str]:
        """What runc can mount (Status reports recursive read-only support from it)."""
        return self._runc.mount_options

    def pid_namespace_path(self, container_id: str) -> str:
        record = self.get(container_id)
        if record.state != ContainerState.RUNNING or not record.pid:
            raise FailedPrecondition(f"target container {container_id} is not running: cannot share its PID namespace")
        return f"/proc/{record.pid}/ns/pid"
