"""`pyshim migrate`: move a running container from a pod on node A to a new pod on node B.

checkpoint on A (stopping it) → checkpoint image built and pushed → pod created on B → restore →
verified running → removed from A. Everything that can be checked before A is frozen is checked
first (B ready to restore, base image on B, registry taking our pushes). A failure before the
container runs on B restores it again on A from the archive; a journal in the work directory lets
a rerun after a kill finish the move or roll it back. The workload is never dead on both nodes.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cri_api import api_pb2 as cri
from criu_glue.archive import ArchiveDigest
from oci.errors import ImageError
from oci.reference import Reference
from oci.registry import Credentials, RegistryClient
from pyshim.client import Client
from pyshim.migration import direct
from pyshim.migration.archive_push import push_checkpoint_archive
from pyshim.migration.journal import Journal, JournalLock, Phase, open_journal
from pyshim.migration.workload import (MoveError, Workload, capture, checkpoint_and_stop, container_config_from,
                                       container_info, containers_in_pod, describe, remove_quietly)

DEFAULT_WORK_DIR = "/var/lib/pyshim-migrate"


@dataclass
class MigrateOptions:
    container_id: str
    source: str  # CRI endpoint of node A
    target: str  # CRI endpoint of node B
    repository: str  # REGISTRY/REPO the checkpoint image goes to (with `direct`: only its name on the target)
    work_dir: Path = Path(DEFAULT_WORK_DIR)
    insecure: bool = False
    credentials: Credentials | None = None
    keep_pod: bool = False  # keep A's pod when the moved container was its last
    verify_seconds: float = 1.0  # how long it must stay running on B before A forgets it
    timeout: float = 600.0
    direct: str = ""  # a command streaming the archive to the target's `checkpoint-image receive` (direct.py)
    archive_dir: Path | None = None  # where the source daemon writes the archive (default: work_dir)
    stall_seconds: float = 60.0  # --lazy: no page arriving for this long undoes the move (lazy_move.py)


@dataclass
class MigrationReport:
    source_container: str
    target_pod: str = ""
    target_container: str = ""
    image: str = ""
    phases_ms: dict = field(default_factory=dict)  # client-side steps, in order
    checkpoint_phases_ms: dict = field(default_factory=dict)  # inside A's daemon
    restore_phases_ms: dict = field(default_factory=dict)  # inside B's daemon
    downtime_ms: float = 0.0
    archive_bytes: int = 0
    transfer_mib_per_s: float = 0.0
    tcp: str = ""  # B's restoreTcp: established, close or none
    resumed_from: str = ""
    receive_phases_ms: dict = field(default_factory=dict)  # --direct: inside B's `checkpoint-image receive`
    streamed_after_checkpoint_bytes: int = 0  # --direct: what was left to send when the checkpoint returned
    stream_ms: float = 0.0  # --direct: from the archive's first byte sent to the target's image stored

    def to_json(self) -> dict:
        return dict(self.__dict__)


class Migration:
    def __init__(self, options: MigrateOptions, source: Client, target: Client, say=print):
        self.options = options
        self.source = source
        self.target = target
        self.say = say
        self.report = MigrationReport(options.container_id)
        self._last = time.monotonic()
        self._frozen_at = 0.0
        self._checkpoint_figures: dict = {}
        self._receiver: direct.Receiver | None = None  # --direct: started before the freeze

    # ---- the move, resumable ------------------------------------------------------------------

    def run(self) -> MigrationReport:
        work_dir = self.options.work_dir
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with JournalLock(work_dir, self.options.container_id):
            journal = self._open_journal()
            if journal.phase != Phase.STARTED:
                self.report.resumed_from = journal.phase.value
                self.say(f"resuming the move recorded in {journal.path} (it stopped at: {journal.phase.value})")
            self._move(journal)
        return self.report

    # What this kind of move is called in messages, and how its journal is opened (a lazy move keeps its own).
    MOVE_KIND = "move"

    def _open_journal(self) -> Journal:
        return open_journal(self.options.work_dir, self.options.source, self.options.target, self.options.container_id)

    def rollback_only(self) -> MigrationReport:
        """`--rollback`: undo an unfinished move recorded in the journal."""
        work_dir = self.options.work_dir
        with JournalLock(work_dir, self.options.container_id):
            journal = self._open_journal()
            if journal.phase == Phase.STARTED and not journal.workload and not journal.target_pod:
                raise MoveError(f"no unfinished {self.MOVE_KIND} of {self.options.container_id} is recorded in "
                                f"{work_dir}")
            self._roll_back(journal)
        return self.report

    def _move(self, journal: Journal) -> None:
        if journal.phase == Phase.RUNNING:
            if self._runs_on_target(journal):
                self._finish_on_source(journal)
                return
            self._fail(journal, MoveError(f"container {journal.target_container} is no longer running on "
                                          f"{self.options.target}"))
        try:
            if journal.phase in (Phase.STARTED, Phase.CHECKPOINTING):
                self._stop_on_source(journal)
            if journal.phase == Phase.CHECKPOINTED:
                self._push(journal)
            if journal.phase in (Phase.PUSHED, Phase.RESTORING):
                self._start_on_target(journal)
        except (MoveError, ImageError, grpc.RpcError, OSError) as e:
            self._fail(journal, e)
        self._await_received_image_synced()
        self._finish_on_source(journal)
        self.report.transfer_mib_per_s = transfer_rate(self.report)

    def _stop_on_source(self, journal: Journal) -> None:
        if journal.phase == Phase.CHECKPOINTING and self._source_checkpointed(journal):
            journal.advance(Phase.CHECKPOINTED)
            return
        workload = self._preflight()
        # One name per container: a rerun racing a still-running checkpoint of a killed run names the same file.
        archive_dir = self.options.archive_dir or self.options.work_dir
        archive_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        archive = archive_dir / f"{workload.container_id}.tar"
        journal.advance(Phase.CHECKPOINTING, workload=workload.to_json(), archive=str(archive))
        if self._receiver is not None:  # --direct: ready since the preflight; it follows the archive as written
            self._receiver.follow(archive)
        started = time.monotonic()
        figures = checkpoint_and_stop(self.source, workload.container_id, str(archive), self.options.timeout,
                                      throwaway_archive=True)
        self._checkpoint_figures = figures
        # Frozen from the runc pause on: the daemon's "prepare" phase ran before it.
        self._frozen_at = started + figures.get("phasesMs", {}).get("prepare", 0) / 1000
        self.report.checkpoint_phases_ms = figures.get("phasesMs", {})
        self.report.archive_bytes = figures.get("archiveBytes", 0)
        self._mark("checkpoint")
        if not figures.get("stopped"):
            raise MoveError(f"{self.options.source} checkpointed {workload.container_id} but did not stop it "
                            "(a daemon without pyshim-checkpoint-mode support?); nothing was moved")
        journal.advance(Phase.CHECKPOINTED)

    def _source_checkpointed(self, journal: Journal) -> bool:
        """After a kill during CheckpointContainer: did the source finish it (archive there, container ended)?"""
        status, info = container_info(self.source, journal.container_id)
        if status.state == cri.CONTAINER_RUNNING:
            return False
        if status.reason == "Checkpointed" and Path(journal.archive).is_file():
            return True
        raise MoveError(f"container {journal.container_id} on {self.options.source} is "
                        f"{cri.ContainerState.Name(status.state)} ({status.reason}) and the archive "
                        f"{journal.archive} is missing: the move cannot go on or back")

    # ---- before anything stops ----------------------------------------------------------------

    def _preflight(self) -> Workload:
        workload = capture(self.source, self.options.container_id)
        if workload.state != cri.CONTAINER_RUNNING:
            raise MoveError(f"container {workload.container_id} on {self.options.source} is "
                            f"{cri.ContainerState.Name(workload.state)}: only a running container can be moved")
        _require_checkpoint_restore(self.source, "checkpointEnabled", "checkpoint")
        _require_checkpoint_restore(self.target, "restoreEnabled", "restore")
        self._require_base_image(workload)
        if self.options.direct:
            # The receiver of the move itself, started and ready (its store open and writable) before
            # anything stops: its start-up is not part of the downtime.
            self._receiver = direct.Receiver(self.options.direct, self.options.timeout, self._image_tag(workload))
            self._receiver.wait_ready()
        else:
            self._registry().check_push_access(self._image_tag(workload), self.options.credentials)
        self._mark("preflight")
        return workload

    def _require_base_image(self, workload: Workload) -> None:
        if not workload.base_image:
            raise MoveError(f"the image of {workload.container_id} has no registry digest on "
                            f"{self.options.source}, so {self.options.target} cannot pull the same one; "
                            "push it to a registry and pull it by name first")
        try:
            self.target.pull(workload.base_image)
        except grpc.RpcError as e:
            raise MoveError(f"{self.options.target} cannot pull the base image {workload.base_image}: "
                            f"{describe(e)}") from None

    def _registry(self) -> RegistryClient:
        registry = Reference.parse(f"{self.options.repository}:probe").registry
        return RegistryClient(insecure_registries=(registry,) if self.options.insecure else (),
                              timeout=self.options.timeout)

    def _image_tag(self, workload: Workload) -> str:
        return f"{self.options.repository}:{workload.name}-{workload.container_id[:12]}"

    # ---- transfer and restore -----------------------------------------------------------------

    def _push(self, journal: Journal) -> None:
        workload = Workload.from_json(journal.workload)
        tag = self._image_tag(workload)
        # The digest the source computed while writing the archive (asked again after a resume).
        figures = self._checkpoint_figures or container_info(self.source, workload.container_id)[1].get("lastCheckpoint", {})
        written = ArchiveDigest.from_json(figures.get("archive"))
        if self.options.direct:
            self._transfer_direct(journal, workload, tag, written)
            self._mark("transfer")  # what was left to send after the checkpoint returned, and storing it
            journal.advance(Phase.PUSHED, image_ref=tag)  # in the target's store already: nothing to pull
        else:
            digest = push_checkpoint_archive(self._registry(), Path(journal.archive), written, tag,
                                             self.options.credentials, self._mark)
            journal.advance(Phase.PUSHED, image_ref=f"{Reference.parse(tag).name}@{digest}")
        self.report.image = journal.image_ref

    def _transfer_direct(self, journal: Journal, workload: Workload, tag: str, written) -> None:
        """The rest of the archive to the target and stored there; the target's pod is made meanwhile
        (it needs no image), and recorded in the journal so that a rollback removes it."""
        if journal.target_pod:  # made by a killed run during its transfer
            remove_quietly(self.target, "", journal.target_pod)
            journal.advance(journal.phase, target_pod="")
        pod: dict = {}

        def make_pod() -> None:
            try:
                pod["id"] = self.target.run_pod(workload.pod_config)
            except grpc.RpcError as e:
                pod["error"] = e

        maker = threading.Thread(target=make_pod, name="target-pod", daemon=True)
        maker.start()
        try:
            self._send_direct(journal, tag, written)
        finally:
            maker.join()
            if pod.get("id"):
                journal.advance(journal.phase, target_pod=pod["id"])
        if "error" in pod:
            raise MoveError(f"restore on {self.options.target}: {describe(pod['error'])}")

    def _send_direct(self, journal: Journal, tag: str, written) -> None:
        """The rest of the archive to the target's receiver, until the target has stored the image."""
        if self._receiver is None:  # after a resume: the archive is complete, sent whole
            self._receiver = direct.Receiver(self.options.direct, self.options.timeout, tag)
        self._receiver.finish(Path(journal.archive), written)
        self.report.receive_phases_ms = self._receiver.phases_ms
        self.report.streamed_after_checkpoint_bytes = self._receiver.tail_bytes
        self.report.stream_ms = round(self._receiver.stream_seconds * 1000, 1)

    def _start_on_target(self, journal: Journal) -> None:
        workload = Workload.from_json(journal.workload)
        # --direct made the pod during the transfer.
        pod_id = journal.target_pod if journal.phase == Phase.PUSHED else ""
        if journal.phase == Phase.RESTORING:  # a rerun: what a killed run made on B is redone
            remove_quietly(self.target, journal.target_container, journal.target_pod)
        journal.advance(Phase.RESTORING, target_pod=pod_id, target_container="")
        try:
            if not self.options.direct:
                self.target.pull(journal.image_ref)
                self._mark("pull")
            if not pod_id:
                pod_id = self.target.run_pod(workload.pod_config)
                journal.advance(Phase.RESTORING, target_pod=pod_id)
            self._mark("create_pod")
            container_id = self.target.create(pod_id, container_config_from(workload.container_config,
                                                                              journal.image_ref),
                                              workload.pod_config)
            journal.advance(Phase.RESTORING, target_container=container_id)
            self._mark("create_container")
            self.target.start(container_id)
        except grpc.RpcError as e:
            raise MoveError(f"restore on {self.options.target}: {describe(e)}") from None
        running_at = time.monotonic()
        self._mark("start")
        if self._frozen_at:
            self.report.downtime_ms = round((running_at - self._frozen_at) * 1000, 1)
        self._verify_running(container_id)
        self._mark("verify")
        _, info = container_info(self.target, container_id)
        self.report.tcp = info.get("restoreTcp", "")
        self.report.restore_phases_ms = info.get("restorePhasesMs", {})
        self.report.target_pod, self.report.target_container = pod_id, container_id
        journal.advance(Phase.RUNNING)

    def _verify_running(self, container_id: str) -> None:
        deadline = time.monotonic() + self.options.verify_seconds
        while True:
            status, _ = container_info(self.target, container_id)
            if status.state != cri.CONTAINER_RUNNING:
                raise MoveError(f"the restored container {container_id} on {self.options.target} is "
                                f"{cri.ContainerState.Name(status.state)} ({status.reason}: {status.message})")
            if time.monotonic() >= deadline:
                return
            time.sleep(0.1)

    def _runs_on_target(self, journal: Journal) -> bool:
        try:
            status, _ = container_info(self.target, journal.target_container)
        except grpc.RpcError:
            return False
        return status.state == cri.CONTAINER_RUNNING

    # ---- the end, either way ------------------------------------------------------------------

    def _finish_on_source(self, journal: Journal) -> None:
        workload = Workload.from_json(journal.workload)
        try:
            self.source.remove(workload.container_id)
            if not self.options.keep_pod and not self._other_containers(workload.pod_id, workload.container_id):
                self.source.stop_pod(workload.pod_id)
                self.source.remove_pod(workload.pod_id)
        except grpc.RpcError as e:
            # The move itself succeeded: say what is left over rather than fail it.
            self.say(f"warning: moved, but cleaning up on {self.options.source} failed: {describe(e)}")
        self._mark("cleanup")
        self.report.target_pod = self.report.target_pod or journal.target_pod
        self.report.target_container = self.report.target_container or journal.target_container
        self.report.image = self.report.image or journal.image_ref
        Path(journal.archive).unlink(missing_ok=True)
        journal.discard()

    def _await_received_image_synced(self) -> None:
        """--direct: the target syncs the received image while the container is restored; the move
        ends when that is done. A failure there does not undo a move whose container runs."""
        receiver, self._receiver = self._receiver, None
        if receiver is None:
            return
        try:
            receiver.wait_durable()
        except MoveError as e:
            self.say(f"warning: moved, but {e}: the checkpoint image there may not survive a host crash")

    def _other_containers(self, pod_id: str, container_id: str) -> list[str]:
        return [c.id for c in containers_in_pod(self.source, pod_id) if c.id != container_id]

    def _fail(self, journal: Journal, error: Exception) -> None:
        message = describe(error) if isinstance(error, grpc.RpcError) else str(error)
        if self._receiver is not None:
            self._receiver.cancel()
            self._receiver = None
        try:
            where = self._roll_back(journal)
        except MoveError as rollback_error:
            raise MoveError(f"{message}; rolling back failed too: {rollback_error}") from None
        raise MoveError(f"{message}; rolled back: {where}")

    def _roll_back(self, journal: Journal) -> str:
        """Remove what was made on B, and make sure the container runs on A again."""
        remove_quietly(self.target, journal.target_container, journal.target_pod)
        if not journal.workload:
            journal.discard()
            return f"nothing had been stopped on {self.options.source}"
        workload = Workload.from_json(journal.workload)
        status, _ = container_info(self.source, workload.container_id)
        if status.state == cri.CONTAINER_RUNNING:
            journal.discard()
            Path(journal.archive).unlink(missing_ok=True)
            return f"container {workload.container_id} still runs on {self.options.source}"
        if not Path(journal.archive).is_file():
            raise MoveError(f"container {workload.container_id} has stopped on {self.options.source} and its "
                            f"archive {journal.archive} is gone")
        restored = self._restore_on_source(workload, journal.archive)
        journal.discard()
        Path(journal.archive).unlink(missing_ok=True)
        self.report.target_container = ""
        return f"container restored on {self.options.source} as {restored} in pod {workload.pod_id}"

    def _restore_on_source(self, workload: Workload, archive: str) -> str:
        try:
            # The ended container holds the name the restored one needs.
            self.source.remove(workload.container_id)
            config = container_config_from(workload.container_config, archive)
            container_id = self.source.create(workload.pod_id, config, workload.pod_config)
            self.source.start(container_id)
        except grpc.RpcError as e:
            raise MoveError(f"restore on {self.options.source} from {archive}: {describe(e)}; the archive is "
                            "kept: restore it with `pyshim create`/`start` naming it as the image") from None
        return container_id

    def _mark(self, phase: str) -> None:
        now = time.monotonic()
        self.report.phases_ms[phase] = round((now - self._last) * 1000, 1)
        self._last = now


def _require_checkpoint_restore(client: Client, flag: str, what: str) -> None:
    try:
        status = client.runtime.Status(cri.StatusRequest(verbose=False), timeout=client.timeout)
    except grpc.RpcError as e:
        raise MoveError(f"{client.endpoint} does not answer: {describe(e)}") from None
    ready = {c.type: c for c in status.status.conditions}
    if not ready.get("RuntimeReady") or not ready["RuntimeReady"].status:
        raise MoveError(f"{client.endpoint} is not ready: {ready.get('RuntimeReady')}")
    facts = json.loads(status.info.get("checkpointRestore", "{}"))
    if not facts.get(flag):
        raise MoveError(f"{client.endpoint} has {what} switched off ({flag} is false in its configuration)")
    if not facts.get("criuUsable"):
        raise MoveError(f"{client.endpoint} cannot {what}: {facts.get('reason') or 'CRIU is not usable there'}")


def transfer_rate(report: MigrationReport) -> float:
    """MiB/s of the archive through push and pull together, or the direct stream (first byte to stored:
    it overlaps the archive's writing, so the "transfer" phase alone is only its tail)."""
    seconds = (report.stream_ms or sum(report.phases_ms.get(p, 0) for p in ("push", "pull", "transfer"))) / 1000
    return round(report.archive_bytes / (1 << 20) / seconds, 1) if seconds and report.archive_bytes else 0.0
