"""Container lifecycle: rootfs, OCI config, conmon + runc, exit tracking, and the durable records.

Every operation that can fail midway undoes what it did (an ExitStack of undo steps), so a failed
CreateContainer leaves no mount, runc container, directory or record behind.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cri_api import api_pb2 as cri
from oci.runtime_spec import (ContainerSpecInput, SpecInputError, build_container_spec, check_seccomp_profile,
                              linux_resources_from_cri, validate_container_config)
from oci.spec_schema import InvalidSpec, validate_spec
from oci.tree_removal import remove_tree
from pyshim.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from pyshim.internal import cgroups, mounts, netns, request_paths, tcp_lock
from pyshim.internal.checkpointer import CheckpointResult
from pyshim.internal.conmon import Conmon, MonitorPaths
from pyshim.internal.host_caps import can_lower_oom_score_adj
from pyshim.internal.phases import PhaseTimer
from pyshim.internal.events import ContainerEvent, EventBus, EventType
from pyshim.internal.restorer import CRIU_CONFIG_ANNOTATION, OpenCheckpoint, Restorer, RestorePlan, TcpMode
from pyshim.internal.runc import ExecResult, Runc, RuncError
from pyshim.internal.sysctls import normalize_sysctl_name
from pyshim.internal.state import (ContainerRecord, ContainerState, RecordStore, SandboxRecord,
                                   decode_config, encode_config)

log = logging.getLogger(__name__)

# Exit code we report when a container vanished without conmon recording one (e.g. host reboot).
UNKNOWN_EXIT_CODE = 255


@dataclass(frozen=True)
class RestoreSource:
    """A CreateContainer that restores: the checked archive and the checkpoint image it came from, if any."""
    plan: RestorePlan
    checkpoint_image_id: str = ""  # "" when the request named an archive path


@dataclass(frozen=True)
class SandboxContext:
    """What a container needs of its pod, handed in by the caller (the container layer never looks pods up)."""
    record: SandboxRecord
    config: "cri.PodSandboxConfig"
    namespaces: dict[str, str | None]
    files: dict[str, str]


def _with_command(config, plan: RestorePlan):
    """CRIU restores the process itself, but config.json must still name one: a checkpoint image has no
    entrypoint, so the checkpointed command is shown when the request gives none."""
    if config.command or config.args or not plan.process_args:
        return config
    copy = type(config)()
    copy.CopyFrom(config)
    copy.command.extend(plan.process_args)
    return copy


def container_name_key(config, sandbox_config) -> str:
    m, p = config.metadata, sandbox_config.metadata
    return f"k8s_{m.name}_{p.name}_{p.namespace}_{p.uid}_{m.attempt}"


class ContainerManager:
    def __init__(self, root: Path, state_dir: Path, runc: Runc, conmon: Conmon, image_store, events: EventBus,
                 restorer: Restorer):
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
        self._restorer = restorer
        self._names: dict[str, str] = {}
        self._lock = threading.RLock()
        self._container_locks: dict[str, threading.Lock] = {}

    # ---- bookkeeping -------------------------------------------------------------------------

    def load(self) -> None:
        """Read the records back after a restart and bring each one up to date with reality."""
        self._records.load()
        for record in self._records.all():
            self._names[record.name] = record.id  # records keep the full reservation key
            self._reconcile(record)

    def _lock_for(self, container_id: str) -> threading.Lock:
        with self._lock:
            return self._container_locks.setdefault(container_id, threading.Lock())

    def _paths(self, record: ContainerRecord) -> MonitorPaths:
        return MonitorPaths(bundle=record.bundle, exit_dir=self._exit_dir,
                            persist_dir=record.bundle / "persist", attach_dir=self._attach_dir)

    def get(self, container_id: str) -> ContainerRecord:
        record = self._records.resolve(container_id)
        if record is None:
            raise NotFound(f"container {container_id!r} not found")
        return self.refresh(record)

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
        with self._lock_for(record.id):
            record.checkpointed_at = time.time_ns()
            record.checkpoint_location = str(result.location)
            record.last_checkpoint = {
                "frozenMs": round(result.frozen_seconds * 1000, 1), "totalMs": round(result.total_seconds * 1000, 1),
                "archiveBytes": result.archive_bytes, "tcpEstablished": result.tcp_established,
                "stopped": result.stopped, "phasesMs": result.phases_ms}
            if result.stopped:
                self._wait_exit(record, 30)
                if record.state == ContainerState.EXITED:
                    # Not an error and not a completion: kubelet and people should see why it ended.
                    record.reason = "Checkpointed"
                    record.message = f"stopped after a checkpoint to {result.location}"
            self._records.save(record)

    # ---- exit tracking -----------------------------------------------------------------------

    def refresh(self, record: ContainerRecord) -> ContainerRecord:
        """Notice that a running container exited (conmon wrote its exit file)."""
        if record.state != ContainerState.RUNNING:
            return record
        exited = Conmon.exit_code(self._paths(record), record.id)
        if exited is None:
            return record
        code, when = exited
        self._mark_exited(record, code, int(when * 1e9))
        return record

    def _mark_exited(self, record: ContainerRecord, code: int, finished_at_ns: int, reason: str = "") -> None:
        record.state = ContainerState.EXITED
        record.exit_code = code
        # conmon's exit-file time and our start stamp come from two clocks reads apart: a process that
        # exits at once may seem to end before it started.
        record.finished_at = max(finished_at_ns, record.started_at)
        oom = (record.bundle / "persist" / "oom").exists()
        record.reason = reason or ("OOMKilled" if oom else "Completed" if code == 0 else "Error")
        record.pid = 0
        self._records.save(record)
        self._publish(record, EventType.STOPPED)

    def _reconcile(self, record: ContainerRecord) -> None:
        if record.state not in (ContainerState.RUNNING, ContainerState.CREATED) or record.pending_restore:
            return
        exited = Conmon.exit_code(self._paths(record), record.id)
        if exited is not None:
            self._mark_exited(record, exited[0], int(exited[1] * 1e9))
            return
        state = self._runc.state(record.id)
        if state is None or state.status == "stopped":
            # The container is gone and nobody recorded its end (the host restarted, or runc state was wiped).
            record.message = "container was gone when the daemon restarted"
            self._mark_exited(record, UNKNOWN_EXIT_CODE, time.time_ns(), reason="Unknown")

    def poll_exits(self) -> None:
        """Called periodically: publishes STOPPED events promptly even if nobody asks for status."""
        for record in self._records.all():
            if record.state == ContainerState.RUNNING:
                self.refresh(record)

    def _publish(self, record: ContainerRecord, kind: EventType) -> None:
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
        with self._reserved_name(config, sandbox) as (container_id, key):
            return self._create_reserved(container_id, key, sandbox, config, image)

    @contextlib.contextmanager
    def _reserved_name(self, config, sandbox: SandboxContext):
        """A fresh id and the container's name reserved for it; the name is freed if creating fails."""
        key = container_name_key(config, sandbox.config)
        container_id = secrets.token_hex(32)
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

    def create_restore(self, sandbox: SandboxContext, config, source: RestoreSource) -> ContainerRecord:
        """Record a container that StartContainer will restore. Cheap on purpose: kubelet gives
        CreateContainer two minutes, and unpacking a big checkpoint can take longer."""
        try:
            validate_container_config(config)
            check_seccomp_profile(config.linux.security_context)  # the spec is built only at StartContainer
        except SpecInputError as e:
            raise InvalidArgument(str(e)) from None
        plan = source.plan
        with self._reserved_name(config, sandbox) as (container_id, key):
            cdir = self._root / container_id
            record = ContainerRecord(
                id=container_id, sandbox_id=sandbox.record.id, name=key, attempt=config.metadata.attempt,
                config_b64=encode_config(config), image_ref=config.image.image,
                image_id=source.checkpoint_image_id or str(plan.source), image_name=config.image.image,
                created_at=time.time_ns(), dir=str(cdir), log_path=self._log_path(sandbox.config, config),
                cgroups_path=f"{sandbox.record.cgroup_parent.rstrip('/')}/{container_id}",
                restore_from=str(plan.source), restored_checkpoint_time=plan.checkpointed_at_ns,
            )
            with contextlib.ExitStack() as undo:
                cdir.mkdir(mode=0o700)
                undo.callback(remove_tree, cdir, ignore_errors=True)
                for sub in (record.upper, record.work, record.rootfs):
                    sub.mkdir(mode=0o755)
                self._records.save(record)
                undo.pop_all()
        self._publish(record, EventType.CREATED)
        log.info("container created for restore", extra={"container": container_id, "sandbox": sandbox.record.id,
                                                         "checkpoint": str(plan.source)})
        return record

    def _create_reserved(self, container_id, key, sandbox: SandboxContext, config, image) -> ContainerRecord:
        cdir = self._root / container_id
        record = ContainerRecord(
            id=container_id, sandbox_id=sandbox.record.id, name=key, attempt=config.metadata.attempt,
            config_b64=encode_config(config), image_ref=config.image.image, image_id=image.id,
            image_name=(image.repo_tags or image.repo_digests or [image.id])[0],
            created_at=time.time_ns(), dir=str(cdir), log_path=self._log_path(sandbox.config, config),
            cgroups_path=f"{sandbox.record.cgroup_parent.rstrip('/')}/{container_id}",
            stop_signal=image.config.stop_signal or "TERM",
        )
        phases = PhaseTimer()
        with contextlib.ExitStack() as undo:
            cdir.mkdir(mode=0o700)
            undo.callback(remove_tree, cdir, ignore_errors=True)
            for sub in (record.upper, record.work, record.rootfs):
                sub.mkdir(mode=0o755)
            layers = self._images.layer_paths(image)
            mounts.mount_overlay(layers, record.upper, record.work, record.rootfs)
            undo.callback(mounts.unmount, record.rootfs)
            phases.mark("rootfs")

            spec = self._build_spec(record, sandbox, config, image)
            (cdir / "config.json").write_text(json.dumps(spec))
            if record.log_path:
                Path(record.log_path).parent.mkdir(parents=True, exist_ok=True)
            phases.mark("spec")

            # Before conmon starts: a create that fails or times out half-way leaves a runc state
            # dir, a `runc init` and the container's cgroups, which must go with it.
            undo.callback(self._discard_runc_container, record)
            record.pid = self._conmon.create(container_id, key, self._paths(record), record.log_path,
                                             stdin=config.stdin, stdin_once=config.stdin_once, tty=config.tty)
            phases.mark("runc_create")
            self._records.save(record)
            phases.mark("record")
            undo.pop_all()
        self._publish(record, EventType.CREATED)
        log.info("container created", extra={"container": container_id, "sandbox": sandbox.record.id,
                                             "image": record.image_name, "ms": phases.report()})
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

    def _build_spec(self, record, sandbox: SandboxContext, config, image) -> dict:
        # The pod's sysctls were validated at RunPodSandbox; runc wants them dot-separated.
        sysctls = {normalize_sysctl_name(k): v for k, v in sandbox.config.linux.sysctls.items()}
        inp = ContainerSpecInput(
            container_id=record.id, rootfs=str(record.rootfs), config=config,
            sandbox_config=sandbox.config, image_config=image.config,
            namespaces=sandbox.namespaces, hostname=sandbox.record.hostname,
            sandbox_files=sandbox.files, cgroups_path=record.cgroups_path,
            annotations={"io.kubernetes.cri.image-name": record.image_name,
                         "io.kubernetes.cri.sandbox-id": sandbox.record.id},
            sysctls=sysctls,
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
    def _log_path(sandbox_config, config) -> str:
        return request_paths.container_log_path(sandbox_config.log_directory, config.log_path)

    # ---- start / stop ------------------------------------------------------------------------

    def start(self, container_id: str) -> ContainerRecord:
        record = self.get(container_id)
        if record.pending_restore:
            raise FailedPrecondition(f"container {record.id} restores from a checkpoint: start it with its pod and base image")
        with self._lock_for(record.id):
            if record.state != ContainerState.CREATED:
                raise FailedPrecondition(f"container {record.id} is {record.state.value}, not CREATED: cannot start it")
            self._runc.start(record.id)
            record.state = ContainerState.RUNNING
            record.started_at = time.time_ns()
            self._records.save(record)
        self._publish(record, EventType.STARTED)
        return self.refresh(record)

    def start_restore(self, container_id: str, sandbox: SandboxContext, base_image,
                      checkpoint: OpenCheckpoint) -> ContainerRecord:
        """Restore the checkpoint into the new pod: rootfs from the base image plus the checkpoint's
        diff, config.json built fresh from the new request, then `runc restore` under conmon.
        On failure the container is EXITED with reason RestoreFailed and nothing is left mounted."""
        record = self.get(container_id)
        with self._lock_for(record.id):
            if record.state != ContainerState.CREATED or not record.pending_restore:
                raise FailedPrecondition(f"container {record.id} is {record.state.value}, not a CREATED restore")
            try:
                self._restore_locked(record, sandbox, base_image, checkpoint)
            except Exception as e:
                message = getattr(e, "message", str(e))
                record.message = message
                self._mark_exited(record, 1, time.time_ns(), reason="RestoreFailed")
                raise
        self._publish(record, EventType.STARTED)
        return self.refresh(record)

    def _restore_locked(self, record: ContainerRecord, sandbox: SandboxContext, base_image,
                        checkpoint: OpenCheckpoint) -> None:
        config = self.config_of(record)
        plan = checkpoint.plan
        mode = self._restorer.tcp_mode(plan, config.annotations, [sandbox.record.ip, *sandbox.record.additional_ips])
        images_dir = record.bundle / "checkpoint"
        phases = PhaseTimer()
        with contextlib.ExitStack() as undo:
            undo.callback(remove_tree, images_dir, ignore_errors=True)  # CRIU is done with them either way
            mounts.mount_overlay(self._images.layer_paths(base_image), record.upper, record.work, record.rootfs)
            failed = undo.enter_context(contextlib.ExitStack())
            failed.callback(mounts.unmount, record.rootfs)
            phases.mark("rootfs")
            record.base_image_id = base_image.id
            spec = self._build_spec(record, sandbox, _with_command(config, plan), base_image)
            unpacked = self._restorer.unpack(checkpoint, images_dir, record.rootfs, record.log_path,
                                             sandbox.record.hostname or socket.gethostname(),
                                             allow_devices=config.linux.security_context.privileged,
                                             keep_setid=self._restorer.keeps_setid_bits(
                                                 spec, config.linux.security_context.privileged))
            self._restorer.check_privileges(unpacked.credentials, spec)
            self._restorer.check_mounts(unpacked.mounts, spec, record.rootfs)
            phases.mark("unpack")
            self._restorer.add_engine_placeholders(spec, plan, record.bundle)
            if mode == TcpMode.ESTABLISHED and sandbox.record.netns_name:
                # The connections come back here: lift the lock a stopping checkpoint left on them.
                tcp_lock.unlock_all(str(netns.netns_path(sandbox.record.netns_name)))
            criu_config = self._restorer.write_criu_config(mode, record.bundle / "criu.conf")
            if criu_config:
                spec.setdefault("annotations", {})[CRIU_CONFIG_ANNOTATION] = str(criu_config)
            (record.bundle / "config.json").write_text(json.dumps(spec))
            phases.mark("spec")
            try:
                record.pid = self._conmon.create(record.id, record.name, self._paths(record), record.log_path,
                                                 stdin=config.stdin, stdin_once=config.stdin_once, tty=config.tty,
                                                 restore_from=images_dir,
                                                 restore_args=self._restorer.runc_restore_args(mode))
            except RuncError as e:
                self._runc.delete(record.id, force=True)
                raise FailedPrecondition(self._restorer.failure_message(record.bundle, e.message)) from None
            phases.mark("runc_restore")
            record.state = ContainerState.RUNNING
            record.started_at = time.time_ns()
            record.restored = True
            record.restore_tcp = mode.value
            record.restore_phases_ms = {**phases.report(), **{f"unpack_{k}": v for k, v in
                                                              unpacked.milliseconds.items()}}
            self._records.save(record)
            failed.pop_all()
        log.info("container restored", extra={"container": record.id, "checkpoint": record.restore_from,
                                               "tcp": mode.value, "image_bytes": unpacked.image_bytes,
                                               "ms": record.restore_phases_ms})

    def stop(self, container_id: str, timeout: float) -> None:
        """SIGTERM (or the image's stop signal), then SIGKILL when `timeout` seconds pass. Idempotent:
        stopping a stopped, removed or unknown container succeeds (CRI: stop and remove may be retried)."""
        record = self.find(container_id)
        if record is None:
            return
        with self._lock_for(record.id):
            if record.state == ContainerState.CREATED and record.pending_restore:
                # Nothing runs yet: the process comes to life only at StartContainer.
                self._mark_exited(record, 137, time.time_ns(), reason="Error")
                return
            if record.state == ContainerState.CREATED:
                # Never started: kill the runc init waiting in `runc create`, so conmon records an exit.
                self._runc.kill(record.id, "KILL")
                self._wait_exit(record, 10)
                if record.state != ContainerState.EXITED:
                    self._mark_exited(record, 137, time.time_ns(), reason="Error")
                return
            if record.state != ContainerState.RUNNING:
                return
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
        with self._lock_for(record.id):
            self.refresh(record)
            if record.state == ContainerState.RUNNING or (record.state == ContainerState.CREATED
                                                          and not record.pending_restore):
                self._runc.kill(record.id, "KILL", all_processes=True)
                self._wait_exit(record, 10)
            self._runc.delete(record.id, force=True)
            mounts.unmount(record.rootfs)
            # Any depth: the writable layer may hold a tree planted by the container or an archive.
            remove_tree(record.dir, ignore_errors=True)
            for leftover in (self._exit_dir / record.id, self._attach_dir / record.id):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
            self._records.delete(record.id)
            with self._lock:
                self._names.pop(record.name, None)
                self._container_locks.pop(record.id, None)
        self._publish(record, EventType.DELETED)
        log.info("container removed", extra={"container": record.id})

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
        Conmon.reopen_log(self._paths(record), Path(record.log_path), timeout)

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

    def pid_namespace_path(self, container_id: str) -> str:
        record = self.get(container_id)
        if record.state != ContainerState.RUNNING or not record.pid:
            raise FailedPrecondition(f"target container {container_id} is not running: cannot share its PID namespace")
        return f"/proc/{record.pid}/ns/pid"
