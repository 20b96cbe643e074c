"""`pyshim migrate --pod POD`: move a whole pod, all its running containers cut at one instant.

CheckpointPod on the source in stop mode (every container frozen, dumped side by side, kept frozen
until the pod checkpoint is complete, then killed: nothing runs on after the cut, so the restored
copy never repeats what the source did meanwhile) → the checkpoint directory handed to the target →
RestorePod there and StartContainer of every container → each verified running → the pod removed
from the source. The same guarantees as `pyshim migrate` of one container (migrate.py):

- everything checkable is checked before the source is frozen (both nodes able to checkpoint /
  restore, the target pulls every base image, the transfer directory is writable);
- the workload is never dead on both nodes: a failure before every container runs on the target
  removes what was made there and restores the pod on the source from its checkpoint (RestorePod in
  a new sandbox at the old address, which the old sandbox gives back first);
- a journal (`<work-dir>/pod-<pod-id>.json`) records each step; after a kill, the same command
  finishes the move or rolls it back, and `--rollback` undoes it.

Transfer is direct, not through a registry: RestorePod takes a directory on the target node (the CRI
says so), and no image format for a pod checkpoint exists that a registry, kubelet or the target
could turn back into one; an image per part would cost a build, a push, a pull and an unpack on top
of the copy. The checkpoint is written into the work dir on the source; `--transfer-dir` names a
directory the target reads at the same path (shared storage, or the target's disk mounted here),
into which it is copied; without it both nodes must see the work dir at the same path.
"""
from __future__ import annotations

import enum
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cri_api import api_pb2 as cri
from pyshim.annotations import CHECKPOINT_MODE_KEY
from pyshim.client import Client
from pyshim.errors import FailedPrecondition
from pyshim.checkpoint_restore import pod_restore as pod_restorer
from pyshim.migration.journal import JournalFile, JournalLock, journal_path, load_journal
from pyshim.migration.migrate import _require_checkpoint_restore
from pyshim.migration.workload import (MoveError, Workload, capture, container_info, containers_in_pod, describe,
                                       pod_config_with_address, remove_quietly)

STOP_METADATA = ((CHECKPOINT_MODE_KEY, "stop"),)


def checkpoint_pod_and_stop(client: Client, pod_id: str, container_ids: list[str], output: Path,
                            timeout: float) -> None:
    """CheckpointPod in stop mode: the containers end once the pod checkpoint in `output` is complete;
    on error they all run on and `output` is left empty."""
    try:
        client.runtime.CheckpointPod(cri.CheckpointPodRequest(
            pod_sandbox_id=pod_id, output_path=str(output), container_ids=container_ids),
            timeout=timeout, metadata=STOP_METADATA)
    except grpc.RpcError as e:
        raise MoveError(f"CheckpointPod of {pod_id} on {client.endpoint}: {describe(e)}") from None


@dataclass
class PodMoveOptions:
    pod_id: str
    source: str
    target: str
    work_dir: Path
    transfer_dir: Path | None = None  # the target reads it at the same path; None: the work dir itself
    verify_seconds: float = 1.0
    timeout: float = 600.0


class PodPhase(str, enum.Enum):
    STARTED = "started"              # nothing stopped yet
    CHECKPOINTING = "checkpointing"  # CheckpointPod (stop) sent: the source may be stopping
    CHECKPOINTED = "checkpointed"    # the pod checkpoint is complete; the source containers have ended
    COPIED = "copied"                # the target can read the checkpoint at `copy`
    RESTORING = "restoring"          # the target pod may exist
    RUNNING = "running"              # every container runs on the target; the source is still to clean


@dataclass
class PodJournal(JournalFile):
    path: str
    source: str
    target: str
    pod_id: str
    phase: PodPhase = PodPhase.STARTED
    workloads: list = field(default_factory=list)  # Workload.to_json() per moved container
    checkpoint: str = ""  # the pod checkpoint on the source
    copy: str = ""  # where the target reads it
    target_pod: str = ""
    target_containers: dict = field(default_factory=dict)  # name -> id on the target
    started_at: float = field(default_factory=time.time)

    @property
    def moved(self) -> list[Workload]:
        return [Workload.from_json(w) for w in self.workloads]


def _journal_key(pod_id: str) -> str:
    return f"pod-{pod_id}"


def open_pod_journal(work_dir: Path, source: str, target: str, pod_id: str) -> PodJournal:
    return load_journal(PodJournal, PodPhase, journal_path(work_dir, _journal_key(pod_id)), source, target,
                        f"pod {pod_id}", pod_id=pod_id)


@dataclass
class PodMoveReport:
    source_pod: str
    target_pod: str = ""
    containers: dict = field(default_factory=dict)  # name -> {"source": id, "target": id}
    phases_ms: dict = field(default_factory=dict)
    checkpoint_phases_ms: dict = field(default_factory=dict)  # inside the source daemon
    downtime_ms: float = 0.0
    checkpoint_bytes: int = 0
    left_on_source: list = field(default_factory=list)  # exited containers removed with the source pod
    resumed_from: str = ""
    rolled_back_to: str = ""  # the source pod a rollback restored into

    def to_json(self) -> dict:
        return dict(self.__dict__)


class PodMigration:
    def __init__(self, options: PodMoveOptions, source: Client, target: Client, say=print):
        self.options = options
        self.source = source
        self.target = target
        self.say = say
        self.report = PodMoveReport(options.pod_id)
        self._last = time.monotonic()
        self._frozen_at = 0.0

    # ---- the move, resumable ------------------------------------------------------------------

    def run(self) -> PodMoveReport:
        self.options.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with JournalLock(self.options.work_dir, _journal_key(self.options.pod_id)):
            journal = self._journal()
            if journal.phase != PodPhase.STARTED:
                self.report.resumed_from = journal.phase.value
                self.say(f"resuming the pod move recorded in {journal.path} (it stopped at: {journal.phase.value})")
            self._move(journal)
        return self.report

    def rollback_only(self) -> PodMoveReport:
        with JournalLock(self.options.work_dir, _journal_key(self.options.pod_id)):
            journal = self._journal()
            if journal.phase == PodPhase.STARTED and not journal.workloads:
                raise MoveError(f"no unfinished move of pod {self.options.pod_id} is recorded in "
                                f"{self.options.work_dir}")
            self.report.rolled_back_to = self._roll_back(journal)
        return self.report

    def _journal(self) -> PodJournal:
        return open_pod_journal(self.options.work_dir, self.options.source, self.options.target, self.options.pod_id)

    def _move(self, journal: PodJournal) -> None:
        if journal.phase == PodPhase.RUNNING:
            if self._all_run_on_target(journal):
                self._finish_on_source(journal)
                return
            self._fail(journal, MoveError(f"the moved containers no longer all run on {self.options.target}"))
        try:
            if journal.phase in (PodPhase.STARTED, PodPhase.CHECKPOINTING):
                self._stop_on_source(journal)
            if journal.phase == PodPhase.CHECKPOINTED:
                self._copy(journal)
            if journal.phase in (PodPhase.COPIED, PodPhase.RESTORING):
                self._start_on_target(journal)
        except (MoveError, grpc.RpcError, OSError) as e:
            self._fail(journal, e)
        self._finish_on_source(journal)

    # ---- before anything stops, and the cut ---------------------------------------------------

    def _preflight(self) -> list[Workload]:
        pod_id = self.options.pod_id
        try:
            ready = self.source.pod_status(pod_id).status.state == cri.SANDBOX_READY
        except grpc.RpcError as e:
            raise MoveError(f"pod {pod_id} on {self.options.source}: {describe(e)}") from None
        if not ready:
            raise MoveError(f"pod {pod_id} on {self.options.source} is not ready: only a running pod can be moved")
        containers = containers_in_pod(self.source, pod_id)
        waiting = [c.id for c in containers if c.state in (cri.CONTAINER_CREATED, cri.CONTAINER_UNKNOWN)]
        if waiting:
            raise MoveError(f"pod {pod_id} has containers that are neither running nor exited ({waiting}); "
                            "start or remove them first: a pod move takes every container that runs")
        running = [c for c in containers if c.state == cri.CONTAINER_RUNNING]
        if not running:
            raise MoveError(f"pod {pod_id} on {self.options.source} has no running container to move")
        self.report.left_on_source = [c.id for c in containers if c.state == cri.CONTAINER_EXITED]
        workloads = [capture(self.source, c.id) for c in running]
        try:  # what RestorePod would refuse on either node must be refused before anything stops
            pod_restorer.check_namespaces(workloads[0].pod_config, [w.container_config for w in workloads])
        except FailedPrecondition as e:
            raise MoveError(f"pod {pod_id} cannot be moved: {e}") from None
        _require_checkpoint_restore(self.source, "checkpointEnabled", "checkpoint")
        _require_checkpoint_restore(self.target, "restoreEnabled", "restore")
        for w in workloads:
            if not w.base_image:
                raise MoveError(f"the image of {w.container_id} ({w.name}) has no registry digest on "
                                f"{self.options.source}, so {self.options.target} cannot pull the same one")
            try:
                self.target.pull(w.base_image)
            except grpc.RpcError as e:
                raise MoveError(f"{self.options.target} cannot pull the base image {w.base_image}: "
                                f"{describe(e)}") from None
        if self.options.transfer_dir is not None and not self.options.transfer_dir.is_dir():
            raise MoveError(f"--transfer-dir {self.options.transfer_dir} is not a directory")
        self._mark("preflight")
        return workloads

    def _checkpoint_dir(self) -> Path:
        return self.options.work_dir / f"pod-{self.options.pod_id}.checkpoint"

    def _stop_on_source(self, journal: PodJournal) -> None:
        if journal.phase == PodPhase.CHECKPOINTING and self._source_checkpointed(journal):
            journal.advance(PodPhase.CHECKPOINTED)
            return
        workloads = self._preflight()
        checkpoint = self._checkpoint_dir()
        shutil.rmtree(checkpoint, ignore_errors=True)  # a killed run's partial output; the pod still runs
        checkpoint.mkdir(mode=0o700)
        journal.advance(PodPhase.CHECKPOINTING, workloads=[w.to_json() for w in workloads],
                        checkpoint=str(checkpoint))
        started = time.monotonic()
        checkpoint_pod_and_stop(self.source, self.options.pod_id, [w.container_id for w in workloads], checkpoint,
                                self.options.timeout)
        figures = container_info(self.source, workloads[0].container_id)[1].get("lastCheckpoint", {})
        self.report.checkpoint_phases_ms = figures.get("phasesMs", {})
        # Frozen from the first `runc pause` on: the daemon's "prepare" phase ran before it.
        self._frozen_at = started + self.report.checkpoint_phases_ms.get("prepare", 0) / 1000
        self.report.checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
        self._mark("checkpoint")
        journal.advance(PodPhase.CHECKPOINTED)

    def _source_checkpointed(self, journal: PodJournal) -> bool:
        """After a kill during CheckpointPod: did the source finish it (checkpoint complete, containers ended)?"""
        states = {w.container_id: container_info(self.source, w.container_id)[0] for w in journal.moved}
        if all(s.state == cri.CONTAINER_RUNNING for s in states.values()):
            return False  # nothing was stopped: checkpoint again
        complete = (Path(journal.checkpoint) / "pod-checkpoint.json").is_file()
        if complete and all(s.state == cri.CONTAINER_EXITED and s.reason == "Checkpointed" for s in states.values()):
            return True
        raise MoveError(f"pod {self.options.pod_id} on {self.options.source} is partly stopped "
                        f"({ {cid: cri.ContainerState.Name(s.state) for cid, s in states.items()} }) and its "
                        f"checkpoint {journal.checkpoint} is {'complete' if complete else 'incomplete'}: look at it, "
                        "then `--rollback`")

    # ---- transfer and restore -----------------------------------------------------------------

    def _copy(self, journal: PodJournal) -> None:
        if self.options.transfer_dir is None:
            journal.advance(PodPhase.COPIED, copy=journal.checkpoint)
            return
        copy = self.options.transfer_dir / Path(journal.checkpoint).name
        shutil.rmtree(copy, ignore_errors=True)
        journal.advance(PodPhase.CHECKPOINTED, copy=str(copy))  # named before it exists: a rollback removes it
        shutil.copytree(journal.checkpoint, copy)
        self._mark("copy")
        journal.advance(PodPhase.COPIED)

    def _start_on_target(self, journal: PodJournal) -> None:
        workloads = journal.moved
        if journal.phase == PodPhase.RESTORING:  # a rerun: what a killed run made on the target is redone
            remove_quietly(self.target, pod_id=journal.target_pod)
        journal.advance(PodPhase.RESTORING, target_pod="", target_containers={})
        pod_config = workloads[0].pod_config
        try:
            response = self.target.runtime.RestorePod(cri.RestorePodRequest(
                checkpoint_path=journal.copy, config=pod_config,
                container_configs=[w.container_config for w in workloads]), timeout=self.options.timeout)
            restored = {c.name: c.container_id for c in response.restored_containers}
            journal.advance(PodPhase.RESTORING, target_pod=response.pod_sandbox_id, target_containers=restored)
            self._mark("restore_pod")
            for w in workloads:
                self.target.start(restored[w.name])
        except grpc.RpcError as e:
            raise MoveError(f"restore on {self.options.target}: {describe(e)}") from None
        self._mark("start")
        if self._frozen_at:
            self.report.downtime_ms = round((time.monotonic() - self._frozen_at) * 1000, 1)
        self._verify_running(restored.values())
        self._mark("verify")
        journal.advance(PodPhase.RUNNING)

    def _verify_running(self, container_ids) -> None:
        deadline = time.monotonic() + self.options.verify_seconds
        while True:
            for cid in container_ids:
                status, _ = container_info(self.target, cid)
                if status.state != cri.CONTAINER_RUNNING:
                    raise MoveError(f"the restored container {cid} on {self.options.target} is "
                                    f"{cri.ContainerState.Name(status.state)} ({status.reason}: {status.message})")
            if time.monotonic() >= deadline:
                return
            time.sleep(0.1)

    def _all_run_on_target(self, journal: PodJournal) -> bool:
        try:
            return all(container_info(self.target, cid)[0].state == cri.CONTAINER_RUNNING
                       for cid in journal.target_containers.values()) and bool(journal.target_containers)
        except grpc.RpcError:
            return False

    # ---- the end, either way ------------------------------------------------------------------

    def _finish_on_source(self, journal: PodJournal) -> None:
        try:
            for c in containers_in_pod(self.source, self.options.pod_id):
                self.source.remove(c.id)
            self.source.stop_pod(self.options.pod_id)
            self.source.remove_pod(self.options.pod_id)
        except grpc.RpcError as e:
            # The move itself succeeded: say what is left over rather than fail it.
            self.say(f"warning: moved, but cleaning up on {self.options.source} failed: {describe(e)}")
        self._remove_checkpoints(journal)
        self._mark("cleanup")
        self.report.target_pod = journal.target_pod
        self.report.containers = {w.name: {"source": w.container_id, "target": journal.target_containers.get(w.name)}
                                  for w in journal.moved}
        journal.discard()

    def _remove_checkpoints(self, journal: PodJournal) -> None:
        for path in {journal.checkpoint, journal.copy} - {""}:
            shutil.rmtree(path, ignore_errors=True)

    def _fail(self, journal: PodJournal, error: Exception) -> None:
        message = describe(error) if isinstance(error, grpc.RpcError) else str(error)
        try:
            where = self._roll_back(journal)
        except MoveError as rollback_error:
            raise MoveError(f"{message}; rolling back failed too: {rollback_error}") from None
        raise MoveError(f"{message}; rolled back: {where}")

    def _roll_back(self, journal: PodJournal) -> str:
        """Remove what was made on the target, and make sure the pod runs on the source again."""
        self._kill_on_target(journal)
        remove_quietly(self.target, pod_id=journal.target_pod)
        if not journal.workloads:
            journal.discard()
            return f"nothing had been stopped on {self.options.source}"
        workloads = journal.moved
        states = {w.container_id: container_info(self.source, w.container_id)[0].state for w in workloads}
        if all(s == cri.CONTAINER_RUNNING for s in states.values()):
            self._remove_checkpoints(journal)
            journal.discard()
            return f"pod {self.options.pod_id} still runs on {self.options.source}"
        if not (Path(journal.checkpoint) / "pod-checkpoint.json").is_file():
            raise MoveError(f"pod {self.options.pod_id} has stopped on {self.options.source} and its checkpoint "
                            f"{journal.checkpoint} is incomplete or gone")
        new_pod = self._restore_on_source(journal, workloads)
        self._remove_checkpoints(journal)
        journal.discard()
        return f"pod restored on {self.options.source} as {new_pod} at {workloads[0].pod_ip}"

    def _kill_on_target(self, journal: PodJournal) -> None:
        """The copies the target already started diverge from the cut the source comes back from: they
        are killed at once (no grace period), not left running through a pod stop."""
        for cid in journal.target_containers.values():
            try:
                self.target.stop(cid, timeout=0)
            except grpc.RpcError:
                pass  # the pod removal that follows takes it down either way

    def _restore_on_source(self, journal: PodJournal, workloads: list[Workload]) -> str:
        first = workloads[0]
        try:
            # The old sandbox holds the address (and the names) the restored pod needs.
            remove_quietly(self.source, pod_id=self.options.pod_id)
            response = self.source.runtime.RestorePod(cri.RestorePodRequest(
                checkpoint_path=journal.checkpoint,
                config=pod_config_with_address(first.pod_config, first.pod_ip, first.pod_mac),
                container_configs=[w.container_config for w in workloads]), timeout=self.options.timeout)
            for c in response.restored_containers:
                self.source.start(c.container_id)
        except grpc.RpcError as e:
            raise MoveError(f"restore on {self.options.source} from {journal.checkpoint}: {describe(e)}; the "
                            "checkpoint is kept: restore it with `pyshim restorep`") from None
        return response.pod_sandbox_id

    def _mark(self, phase: str) -> None:
        now = time.monotonic()
        self.report.phases_ms[phase] = round((now - self._last) * 1000, 1)
        self._last = now


def print_report(report: PodMoveReport) -> None:
    print(f"moved pod {report.source_pod} -> pod {report.target_pod}")
    for name, ids in report.containers.items():
        print(f"  {name}: {ids['source'][:13]} -> {ids['target']}")
    if report.downtime_ms:
        print(f"  downtime  {report.downtime_ms:.0f} ms (first freeze on the source to the last start on the target)")
    if report.checkpoint_bytes:
        print(f"  checkpoint {report.checkpoint_bytes / (1 << 20):.1f} MiB")
    print("  phases (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in report.phases_ms.items()))
    if report.checkpoint_phases_ms:
        print("  checkpoint on the source (ms): " +
              ", ".join(f"{k} {v:.0f}" for k, v in report.checkpoint_phases_ms.items()))


def cmd_migrate_pod(args) -> int:
    """`pyshim migrate --pod POD` (pyshim/migration/commands.py dispatches here)."""
    if not args.pod or args.container:
        print("pyshim migrate: give a container id or --pod POD, not both", file=sys.stderr)
        return 2
    unused = [flag for flag, value in (("--registry", args.repository), ("--direct", getattr(args, "direct", None)),
                                       ("--creds", args.creds), ("--insecure", args.insecure),
                                       ("--keep-pod", args.keep_pod)) if value]
    if unused:
        print(f"pyshim migrate --pod: {', '.join(unused)} do not apply to a pod move (its checkpoint goes "
              "directly, see --transfer-dir; the source pod is always removed)", file=sys.stderr)
        return 2
    options = PodMoveOptions(pod_id=args.pod, source=args.source, target=args.target, work_dir=Path(args.work_dir),
                             transfer_dir=Path(args.transfer_dir) if args.transfer_dir else None,
                             verify_seconds=args.verify_seconds, timeout=args.timeout)
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    with Client(args.source, timeout=args.timeout) as source, Client(args.target, timeout=args.timeout) as target:
        migration = PodMigration(options, source, target, say=say)
        try:
            report = migration.rollback_only() if args.rollback else migration.run()
        except (MoveError, OSError) as e:
            print(f"pyshim migrate: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    elif args.rollback:
        print(f"rolled back the move of pod {args.pod}: {report.rolled_back_to}")
    else:
        print_report(report)
    return 0
