"""`pyshim migrate --lazy`: post-copy. The target runs the container before its memory has arrived.

preflight (as the eager move, plus: the source can serve pages, fs.pipe-max-size) → lazy checkpoint on
the source (CheckpointContainer `pyshim-checkpoint-mode: lazy`: the container is frozen, everything but
its memory is archived, CRIU serves the memory at --page-server) → the small archive to the target
(--direct or the registry) → pod, CreateContainer with `io.pyshim.restore.lazy-page-server`, StartContainer
on the target: it runs, its lazy-pages daemon pulls pages on fault and in the background → the target's
verbose `lazyPages` is `complete` → the source ends its frozen container (`lazy-finish`: EXITED, reason
Checkpointed) → the source container (and its pod, if empty) is removed.

Where the state lives: until the target reports every page arrived, the source's frozen tasks hold the
complete state (the dump runs with --leave-running), so every failure before that rolls back: the target
container is removed and the source thawed (`lazy-resume`); it runs on from the instant it was frozen.
What the target did meanwhile (it ran since its restore) is lost. After `complete`, the source's copy is
ended: from then on the target alone holds the workload.

The journal (`<work-dir>/<id>.lazy.json`) records where the move stands; a rerun of the same command after
a kill finishes it (the target still running: wait for its pages) or rolls it back; `--status ID` shows
the phase and the target's pages copied/total.
"""
from __future__ import annotations

import ipaddress
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cri_api import api_pb2 as cri
from criu_glue.lazy_pages import PageServer
from pyshim.annotations import (CHECKPOINT_ARCHIVE_KEY, CHECKPOINT_MODE_KEY, PAGE_SERVER_KEY,
                                RESTORE_LAZY_PAGE_SERVER_ANNOTATION)
from pyshim.client import Client
from pyshim.internal import crashpoints
from pyshim.migration.journal import Journal, JournalLock, Phase, journal_path, load_journal
from pyshim.migration.migrate import Migration, MigrationReport
from pyshim.migration.workload import MoveError, Workload, container_info, describe, remove_quietly

# CRIU's page server port when --page-server names only an address: a random one in this range.
PAGE_SERVER_PORTS = (27000, 27999)
_POLL_SECONDS = 0.1


@dataclass
class LazyMigrationReport(MigrationReport):
    frozen_at_unix: float = 0.0   # when the source was frozen (wall clock: for clients measuring the gap)
    lazy_pages: dict = field(default_factory=dict)  # the target's verbose lazyPages* at the end


@dataclass
class LazyJournal(Journal):
    page_server: str = ""      # ADDR:PORT the target pulls pages from
    frozen_at: float = 0.0     # time.time() the source was frozen (downtime across a rerun)


def lazy_journal_path(work_dir: Path, container_id: str) -> Path:
    return journal_path(work_dir, container_id).with_suffix(".lazy.json")


def open_lazy_journal(work_dir: Path, source: str, target: str, container_id: str) -> LazyJournal:
    return load_journal(LazyJournal, Phase, lazy_journal_path(work_dir, container_id), source, target,
                        container_id, container_id=container_id)


def page_server_address(text: str) -> PageServer:
    """--page-server ADDR[:PORT]; a random port when none is given. MoveError when it is not numeric."""
    try:
        return PageServer.parse(text)
    except ValueError:
        pass
    address = text.strip().strip("[]")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise MoveError(f"--page-server {text!r}: give the numeric address at which the target node reaches the "
                        "source node, optionally with :PORT") from None
    return PageServer(address, random.randint(*PAGE_SERVER_PORTS))


class LazyMigration(Migration):
    def __init__(self, options, source: Client, target: Client, page_server: PageServer | None, say=print):
        super().__init__(options, source, target, say)
        self.page_server = page_server
        self.report = LazyMigrationReport(options.container_id)

    def run(self):
        work_dir = self.options.work_dir
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with JournalLock(work_dir, self.options.container_id):
            journal = self._open_journal()
            if journal.phase != Phase.STARTED:
                self.report.resumed_from = journal.phase.value
                self.say(f"resuming the lazy move recorded in {journal.path} (it stopped at: {journal.phase.value})")
                self._frozen_at = time.monotonic() - (time.time() - journal.frozen_at) if journal.frozen_at else 0.0
            elif self.page_server is None:
                raise MoveError("--lazy needs --page-server ADDRESS[:PORT]: the source node's address the target "
                                "node reaches")
            self._move(journal)
        return self.report

    MOVE_KIND = "lazy move"

    def _open_journal(self) -> LazyJournal:
        return open_lazy_journal(self.options.work_dir, self.options.source, self.options.target,
                                 self.options.container_id)

    def _move(self, journal: LazyJournal) -> None:
        try:
            if journal.phase in (Phase.STARTED, Phase.CHECKPOINTING):
                self._stop_on_source(journal)
            if journal.phase == Phase.CHECKPOINTED:
                self._push(journal)
            if journal.phase in (Phase.PUSHED, Phase.RESTORING):
                self._start_on_target(journal)
            if journal.phase == Phase.RUNNING:
                self._wait_for_pages(journal)
        except (MoveError, OSError, grpc.RpcError) as e:
            self._fail(journal, e)
        self._finish_on_source(journal)

    # ---- the source: frozen, serving its memory ------------------------------------------------

    def _stop_on_source(self, journal: LazyJournal) -> None:
        if journal.phase == Phase.CHECKPOINTING:
            if self._source_dump_state(journal.container_id):
                journal.advance(Phase.CHECKPOINTED)
                return
            journal.advance(Phase.STARTED)  # the lazy checkpoint never took: start over
            if self.page_server is None:
                self.page_server = PageServer.parse(journal.page_server)
        self._require_lazy_source()
        workload = self._preflight()
        self._make_target_pod(journal, workload)
        archive_dir = self.options.archive_dir or self.options.work_dir
        archive_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        archive = archive_dir / f"{workload.container_id}.tar"
        journal.advance(Phase.CHECKPOINTING, workload=workload.to_json(), archive=str(archive),
                        page_server=str(self.page_server))
        if self._receiver is not None:  # --direct: started and ready in the preflight; follows the archive
            self._receiver.follow(archive)
        started = time.monotonic()
        metadata = ((CHECKPOINT_MODE_KEY, "lazy"), (PAGE_SERVER_KEY, str(self.page_server)),
                    (CHECKPOINT_ARCHIVE_KEY, "throwaway"))
        try:
            self.source.runtime.CheckpointContainer(
                cri.CheckpointContainerRequest(container_id=workload.container_id, location=str(archive)),
                timeout=self.options.timeout, metadata=metadata)
        except grpc.RpcError as e:
            raise MoveError(f"lazy checkpoint of {workload.container_id} on {self.options.source}: "
                            f"{describe(e)}") from None
        figures = container_info(self.source, workload.container_id)[1].get("lastCheckpoint", {})
        self._checkpoint_figures = figures
        self._frozen_at = started + figures.get("phasesMs", {}).get("prepare", 0) / 1000
        self.report.checkpoint_phases_ms = figures.get("phasesMs", {})
        self.report.archive_bytes = figures.get("archiveBytes", 0)
        self._mark("checkpoint")
        self.report.frozen_at_unix = time.time() - (time.monotonic() - self._frozen_at)
        journal.advance(Phase.CHECKPOINTED, frozen_at=self.report.frozen_at_unix)

    def _make_target_pod(self, journal: LazyJournal, workload: Workload) -> None:
        """The target's pod, made before the source is frozen: RunPodSandbox (network namespace, CNI:
        ~100 ms) is then no part of the downtime. Journaled at once (phase still STARTED: nothing is
        stopped), so a failure, a --rollback or a rerun after a kill removes it."""
        if journal.target_pod:  # a killed run's, made before it froze anything: start afresh
            remove_quietly(self.target, "", journal.target_pod)
            journal.advance(Phase.STARTED, target_pod="")
        try:
            pod_id = self.target.run_pod(workload.pod_config)
        except grpc.RpcError as e:
            raise MoveError(f"cannot make the pod on {self.options.target}: {describe(e)}") from None
        journal.advance(Phase.STARTED, target_pod=pod_id)
        crashpoints.reached("migrate_lazy:target_pod")
        self._mark("target_pod")

    def _transfer_direct(self, journal: LazyJournal, workload: Workload, tag: str, written) -> None:
        """Only the archive: the target's pod was made before the freeze (_make_target_pod)."""
        if not journal.target_pod:  # a journal of an older pyshim, whose pod is made during the transfer
            super()._transfer_direct(journal, workload, tag, written)
            return
        self._send_direct(journal, tag, written)

    def _require_lazy_source(self) -> None:
        facts = _checkpoint_restore_facts(self.source)
        problem = facts.get("lazySourceProblem")
        if problem is None:
            raise MoveError(f"{self.options.source} does not support lazy checkpoints (an older pyshim?)")
        if problem:
            raise MoveError(f"{self.options.source} cannot serve a lazy move's memory: {problem}")

    def _source_dump_state(self, container_id: str) -> str:
        """The source's verbose lazyDump state ("" when it has no lazy checkpoint in flight). MoveError when
        the source does not answer: what to do next depends on it, so never guess."""
        try:
            _, info = container_info(self.source, container_id)
        except grpc.RpcError as e:
            raise MoveError(f"container {container_id} on {self.options.source}: {describe(e)}; rerun the same "
                            "command once the source answers") from None
        return (info.get("lazyDump") or {}).get("state", "")

    # ---- the target: runs at once, pulls its pages -----------------------------------------------

    def _start_on_target(self, journal: LazyJournal) -> None:
        workload = Workload.from_json(journal.workload)
        workload.container_config.annotations[RESTORE_LAZY_PAGE_SERVER_ANNOTATION] = journal.page_server
        journal.workload = workload.to_json()
        # The eager flow with this config: pod, create, start, verify running.
        super()._start_on_target(journal)

    def _verify_running(self, container_id: str) -> None:
        status, _ = container_info(self.target, container_id)
        if status.state != cri.CONTAINER_RUNNING:
            raise MoveError(f"the restored container {container_id} on {self.options.target} is "
                            f"{cri.ContainerState.Name(status.state)} ({status.reason}: {status.message})")

    def _wait_for_pages(self, journal: LazyJournal) -> None:
        """Until the target says every page arrived; MoveError when its transfer failed."""
        deadline = time.monotonic() + self.options.timeout
        progress, progress_at = -1, time.monotonic()
        while True:
            status, info = container_info(self.target, journal.target_container)
            state = info.get("lazyPages", "")
            copied = info.get("lazyPagesCopiedBytes", 0)
            if copied != progress:
                progress, progress_at = copied, time.monotonic()
            # Only "complete" ends the source: "ended" (the target's process stopped before every page
            # came) leaves the only whole copy on the source, which the rollback then thaws.
            if state == "complete":
                break
            if state == "failed" or status.state != cri.CONTAINER_RUNNING:
                raise MoveError(f"the target's page transfer ended before every page arrived (lazyPages "
                                f"{state or 'unknown'}, container {cri.ContainerState.Name(status.state)} "
                                f"{status.reason}: {info.get('lazyPagesMessage') or status.message})")
            if state == "transferring" and time.monotonic() - progress_at > self.options.stall_seconds:
                # Pages that stop coming would leave the target's process blocked on a fault forever: the
                # source still holds everything, so the move is undone rather than left hanging.
                raise MoveError(f"the target's page transfer stalled: no page arrived for "
                                f"{self.options.stall_seconds:.0f}s ({copied} of {info.get('lazyPagesTotalBytes')} bytes)")
            if time.monotonic() > deadline:
                raise MoveError(f"the target's pages did not all arrive within {self.options.timeout:.0f}s "
                                f"({info.get('lazyPagesCopiedBytes')} of {info.get('lazyPagesTotalBytes')} bytes)")
            time.sleep(_POLL_SECONDS)
        self._mark("pages")
        self.report.lazy_pages = {k: info.get(k) for k in ("lazyPages", "lazyPagesTotalBytes",
                                                           "lazyPagesCopiedBytes", "lazyPagesMs")}
        # The source's frozen copy ends now: the target alone holds the workload from here on (a rerun
        # after a kill right after this finds no dump in flight any more: nothing to end).
        if self._source_dump_state(journal.container_id):
            self._lazy_call(journal.container_id, "lazy-finish")
        self._mark("finish_source")

    # ---- the end, either way ------------------------------------------------------------------

    def _roll_back(self, journal: LazyJournal) -> str:
        """Remove what was made on the target; thaw the source, whose frozen tasks hold the whole state."""
        if journal.target_container and self._target_has_every_page(journal.target_container):
            raise MoveError(f"container {journal.target_container} on {self.options.target} has every page: it alone "
                            "holds the workload now, so the move is not undone; rerun without --rollback to finish")
        remove_quietly(self.target, journal.target_container, journal.target_pod)
        if not journal.workload:
            journal.discard()
            return f"nothing had been stopped on {self.options.source}"
        workload = Workload.from_json(journal.workload)
        if self._source_dump_state(workload.container_id):
            self._lazy_call(workload.container_id, "lazy-resume")
        status, _ = _container_info_or_move_error(self.source, workload.container_id)
        Path(journal.archive).unlink(missing_ok=True)
        if status.state != cri.CONTAINER_RUNNING:
            raise MoveError(f"container {workload.container_id} on {self.options.source} is "
                            f"{cri.ContainerState.Name(status.state)} ({status.reason}); a lazy move keeps no "
                            "archive with its memory to restore it from")
        journal.discard()
        self.report.target_container = ""
        return f"container {workload.container_id} thawed on {self.options.source}, it runs on from where it was frozen"

    def _target_has_every_page(self, container_id: str) -> bool:
        try:
            _, info = container_info(self.target, container_id)
        except grpc.RpcError:
            return False
        return info.get("lazyPages") == "complete"

    def _lazy_call(self, container_id: str, mode: str) -> None:
        try:
            self.source.runtime.CheckpointContainer(
                cri.CheckpointContainerRequest(container_id=container_id), timeout=self.options.timeout,
                metadata=((CHECKPOINT_MODE_KEY, mode),))
        except grpc.RpcError as e:
            raise MoveError(f"{mode} of {container_id} on {self.options.source}: {describe(e)}") from None


def _container_info_or_move_error(client: Client, container_id: str):
    try:
        return container_info(client, container_id)
    except grpc.RpcError as e:
        raise MoveError(f"container {container_id} on {client.endpoint}: {describe(e)}") from None


def _checkpoint_restore_facts(client: Client) -> dict:
    try:
        status = client.runtime.Status(cri.StatusRequest(verbose=False), timeout=client.timeout)
    except grpc.RpcError as e:
        raise MoveError(f"{client.endpoint} does not answer: {describe(e)}") from None
    return json.loads(status.info.get("checkpointRestore", "{}"))


def status_of(work_dir: Path, container_id: str, timeout: float = 30) -> dict:
    """`pyshim migrate --status ID`: the journal's phase, and the target's page transfer when it runs."""
    path = lazy_journal_path(work_dir, container_id)
    if not path.is_file():
        path = journal_path(work_dir, container_id)
        if not path.is_file():
            raise MoveError(f"no move of {container_id} is in flight (no journal in {work_dir})")
    doc = json.loads(path.read_text())
    out = {"container": container_id, "journal": str(path), "phase": doc.get("phase"),
           "from": doc.get("source"), "to": doc.get("target"), "lazy": path.name.endswith(".lazy.json")}
    for key in ("page_server", "target_pod", "target_container"):
        if doc.get(key):
            out[key] = doc[key]
    if doc.get("target_container"):
        try:
            with Client(doc["target"], timeout=timeout) as target:
                status, info = container_info(target, doc["target_container"])
            out["target_state"] = cri.ContainerState.Name(status.state)
            out.update({k: v for k, v in info.items() if k.startswith("lazyPages")})
        except grpc.RpcError as e:
            out["target_error"] = describe(e)
    return out
