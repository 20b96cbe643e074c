"""Host restart without losing containers: `pyshim node checkpoint-all` and `pyshim node restore-all`.

checkpoint-all, run before the daemon and the host stop, checkpoints each pod's running containers
at one instant (CheckpointPod in stop mode: all frozen, dumped side by side, killed once the pod
checkpoint `<dir>/<pod-id>/` is complete), records the pod's config, IP and MAC in a manifest, and
removes the pod: its address is released, so that it can be asked for again. restore-all, run when
the daemon is back, restores each pod with RestorePod -- the same config and the same IP and MAC (the
`io.pyshim.network.*` annotations) -- and starts its containers. Because the pod's address is the
same, established TCP connections to peers outside the pod are restored too (the lock taken at the
checkpoint kept peers from seeing a reset while the pod was away), and so are the connections between
the pod's containers over its loopback.

A pod whose checkpoint fails keeps running, all its containers, and is reported; a pod that cannot be
restored (RestorePod or one StartContainer failing) is removed again, whole, and keeps its entry and
checkpoint in the manifest, so that restore-all can be run again. Manifests of earlier versions (one
archive per container) are still restored, container by container.

Pods whose containers share one PID namespace (the CRI's zero value; kubelet's shareProcessNamespace)
are checkpointed at one instant all the same, but RestorePod refuses them (checkpoint_restore/pod_restore.py: a
container restored first may take PIDs the next one needs). restore-all brings them back as before:
their pod recreated at its address, each container restored from its part of the pod checkpoint
(an ordinary container archive) by CreateContainer + StartContainer, one after another.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cri_api import api_pb2 as cri
from criu_glue import pod_checkpoint as podfmt
from criu_glue.errors import ArchiveError
from pyshim.client import Client
from pyshim.errors import FailedPrecondition
from pyshim.checkpoint_restore import pod_restore as pod_restorer
from pyshim.internal.atomic import write_json_atomic
from pyshim.migration.pod_move import checkpoint_pod_and_stop
from pyshim.migration.workload import (MoveError, Workload, capture, container_config_from, containers_in_pod,
                                       describe, pod_config_with_address, remove_quietly)

DEFAULT_DIR = "/var/lib/pyshim-host-restart"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: one pod checkpoint per pod; 1 (no version): one archive per container
_POD_ID = re.compile(r"[0-9a-f]{64}")


@dataclass
class SavedPod:
    """A pod checkpoint: the pod's containers (each with its pod's config, id, IP, MAC) and its directory."""
    workloads: list[Workload]
    checkpoint: str

    @property
    def first(self) -> Workload:
        return self.workloads[0]

    def to_json(self) -> dict:
        return {"workloads": [w.to_json() for w in self.workloads], "checkpoint": self.checkpoint}

    @classmethod
    def from_json(cls, doc: dict) -> "SavedPod":
        return cls([Workload.from_json(w) for w in doc["workloads"]], doc["checkpoint"])


@dataclass
class SavedContainer:
    workload: Workload
    archive: str


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)  # "pod/container -> new id" lines
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


class Manifest:
    """The containers saved for a restart, grouped by the pod they belonged to."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / MANIFEST
        self.saved: list[SavedContainer] = []  # from a version 1 manifest
        self.saved_pods: list[SavedPod] = []

    def load(self) -> "Manifest":
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return self
        self.saved = [SavedContainer(Workload.from_json(e["workload"]), e["archive"])
                      for e in doc.get("containers", [])]
        self.saved_pods = [SavedPod.from_json(e) for e in doc.get("pods", [])]
        return self

    def save(self) -> None:
        doc = {"version": MANIFEST_VERSION, "pods": [p.to_json() for p in self.saved_pods],
               "containers": [{"workload": s.workload.to_json(), "archive": s.archive} for s in self.saved]}
        write_json_atomic(self.path, doc, mode=0o600)

    @property
    def empty(self) -> bool:
        return not self.saved and not self.saved_pods

    def pods(self) -> dict[str, list[SavedContainer]]:
        grouped: dict[str, list[SavedContainer]] = {}
        for saved in self.saved:
            grouped.setdefault(saved.workload.pod_id, []).append(saved)
        return grouped


def checkpoint_all(client: Client, directory: Path, timeout: float = 600) -> Outcome:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    manifest = Manifest(directory).load()
    outcome = Outcome()
    running = client.runtime.ListContainers(
        cri.ListContainersRequest(filter=cri.ContainerFilter(state=cri.ContainerStateValue(
            state=cri.CONTAINER_RUNNING))), timeout=client.timeout).containers
    by_pod: dict[str, list[str]] = {}
    for container in running:
        by_pod.setdefault(container.pod_sandbox_id, []).append(container.id)
    for pod_id, container_ids in by_pod.items():
        saved = _checkpoint_pod(client, directory, pod_id, container_ids, timeout, outcome)
        if saved is None:
            continue
        manifest.saved_pods.append(saved)
        manifest.save()
        pod_name = saved.first.pod_config.metadata.name
        outcome.done.extend(f"{pod_name}/{w.name} ({w.container_id}) -> {saved.checkpoint}" for w in saved.workloads)
        # Frees the pod's address (CNI DEL), which its restored self asks for again.
        try:
            client.stop_pod(pod_id)
            client.remove_pod(pod_id)
        except grpc.RpcError as e:
            outcome.failed.append(f"pod {pod_id}: saved, but removing it failed: {describe(e)}")
    return outcome


def _checkpoint_pod(client: Client, directory: Path, pod_id: str, container_ids: list[str], timeout: float,
                    outcome: Outcome) -> SavedPod | None:
    """One pod's running containers at one instant, stopped once saved; None (reported) if it failed."""
    if not _POD_ID.fullmatch(pod_id):
        outcome.failed.append(f"pod {pod_id!r}: not a pod id this command can name a directory after")
        return None
    checkpoint = directory / pod_id
    try:
        workloads = [capture(client, cid) for cid in container_ids]
        shutil.rmtree(checkpoint, ignore_errors=True)  # an earlier failed run's; the pod runs, so it is stale
        checkpoint.mkdir(mode=0o700)
        checkpoint_pod_and_stop(client, pod_id, container_ids, checkpoint, timeout)
    except (MoveError, grpc.RpcError, OSError) as e:
        shutil.rmtree(checkpoint, ignore_errors=True)
        error = describe(e) if isinstance(e, grpc.RpcError) else str(e)
        outcome.failed.extend(f"{cid}: {error} (its pod {pod_id} keeps running)" for cid in container_ids)
        return None
    return SavedPod(workloads, str(checkpoint))


def restore_all(client: Client, directory: Path) -> Outcome:
    manifest = Manifest(directory).load()
    outcome = Outcome()
    for saved in list(manifest.saved_pods):
        if _restore_pod(client, saved, outcome):
            manifest.saved_pods.remove(saved)
            manifest.save()
            shutil.rmtree(saved.checkpoint, ignore_errors=True)
    _restore_legacy_containers(client, manifest, outcome)
    if manifest.empty:
        manifest.path.unlink(missing_ok=True)
    return outcome


def _restore_pod(client: Client, saved: SavedPod, outcome: Outcome) -> bool:
    if _shares_pid_namespace(saved):
        return _restore_pod_container_by_container(client, saved, outcome)
    first = saved.first
    pod_name = first.pod_config.metadata.name
    # A rerun after a killed restore-all: the pod may be back already (done), or half back (redone).
    existing = _ready_pod_like(client, first.pod_config)
    if existing:
        if _runs_all(client, existing, [w.name for w in saved.workloads]):
            outcome.done.extend(f"{pod_name}/{w.name}: {w.container_id} -> already restored (pod {existing})"
                                for w in saved.workloads)
            return True
        remove_quietly(client, pod_id=existing)
    new_pod = ""
    try:
        response = client.runtime.RestorePod(cri.RestorePodRequest(
            checkpoint_path=saved.checkpoint,
            config=pod_config_with_address(first.pod_config, first.pod_ip, first.pod_mac),
            container_configs=[w.container_config for w in saved.workloads]), timeout=client.timeout)
        new_pod = response.pod_sandbox_id
        restored = {c.name: c.container_id for c in response.restored_containers}
        for w in saved.workloads:
            client.start(restored[w.name])
    except grpc.RpcError as e:
        outcome.failed.extend(f"{w.container_id}: restoring pod {pod_name} at {first.pod_ip} from "
                              f"{saved.checkpoint}: {describe(e)}" for w in saved.workloads)
        # All or nothing: a half-restored pod would break the cut; the address is given back for a rerun.
        remove_quietly(client, pod_id=new_pod)
        return False
    outcome.done.extend(f"{pod_name}/{w.name}: {w.container_id} -> {restored[w.name]} (pod {new_pod}, "
                        f"{first.pod_ip})" for w in saved.workloads)
    return True


def _shares_pid_namespace(saved: SavedPod) -> bool:
    try:
        pod_restorer.check_namespaces(saved.first.pod_config, [w.container_config for w in saved.workloads])
    except FailedPrecondition:
        return True
    return False


def _restore_pod_container_by_container(client: Client, saved: SavedPod, outcome: Outcome) -> bool:
    """A pod sharing one PID namespace: its pod at its address, then each container from its part."""
    first = saved.first
    pod_name = first.pod_config.metadata.name
    try:
        parts = {c.name: str(Path(saved.checkpoint) / c.part) for c in podfmt.read_manifest(saved.checkpoint).containers}
        pod_id = _ready_pod_like(client, first.pod_config) or client.run_pod(
            pod_config_with_address(first.pod_config, first.pod_ip, first.pod_mac))
    except (ArchiveError, grpc.RpcError) as e:
        error = describe(e) if isinstance(e, grpc.RpcError) else str(e)
        outcome.failed.extend(f"{w.container_id}: restoring pod {pod_name} at {first.pod_ip}: {error}"
                              for w in saved.workloads)
        return False
    back = {c.metadata.name for c in containers_in_pod(client, pod_id) if c.state == cri.CONTAINER_RUNNING}
    ok = True
    for w in saved.workloads:
        if w.name in back:
            continue  # a rerun: this one came back already
        restored = _restore_container(client, pod_id, SavedContainer(w, parts.get(w.name, "")), outcome)
        ok = ok and bool(restored)
        if restored:
            outcome.done.append(f"{pod_name}/{w.name}: {w.container_id} -> {restored} (pod {pod_id}, {first.pod_ip})")
    if not _has_containers(client, pod_id):
        remove_quietly(client, pod_id=pod_id)  # the address back for a rerun
    return ok


def _runs_all(client: Client, pod_id: str, names: list[str]) -> bool:
    running = {c.metadata.name for c in containers_in_pod(client, pod_id) if c.state == cri.CONTAINER_RUNNING}
    return set(names) <= running


def _restore_legacy_containers(client: Client, manifest: Manifest, outcome: Outcome) -> None:
    """A version 1 manifest (written by an earlier pyshim): one archive per container."""
    for saved in manifest.pods().values():
        first = saved[0].workload
        try:
            # A rerun after a partial restore finds the pod already back.
            new_pod = _ready_pod_like(client, first.pod_config) or client.run_pod(
                pod_config_with_address(first.pod_config, first.pod_ip, first.pod_mac))
        except grpc.RpcError as e:
            outcome.failed.extend(f"{s.workload.container_id}: recreating pod {first.pod_config.metadata.name} "
                                  f"at {first.pod_ip}: {describe(e)}" for s in saved)
            continue
        for entry in saved:
            restored = _restore_container(client, new_pod, entry, outcome)
            if restored:
                manifest.saved.remove(entry)
                manifest.save()
                Path(entry.archive).unlink(missing_ok=True)
                outcome.done.append(f"{first.pod_config.metadata.name}/{entry.workload.name}: "
                                    f"{entry.workload.container_id} -> {restored} (pod {new_pod}, {first.pod_ip})")
        if not _has_containers(client, new_pod):
            # Nothing came back in it: give the address back so that a rerun can have it again.
            remove_quietly(client, pod_id=new_pod)


def _restore_container(client: Client, pod_id: str, entry: SavedContainer, outcome: Outcome) -> str:
    workload = entry.workload
    new_id = ""
    try:
        new_id = client.create(pod_id, container_config_from(workload.container_config, entry.archive),
                               workload.pod_config)
        client.start(new_id)
        return new_id
    except grpc.RpcError as e:
        outcome.failed.append(f"{workload.container_id}: restore from {entry.archive}: {describe(e)}")
        # The failed one would hold the name a rerun needs.
        remove_quietly(client, container_id=new_id)
        return ""


def _ready_pod_like(client: Client, pod_config) -> str:
    m = pod_config.metadata
    pods = client.runtime.ListPodSandbox(cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(
        state=cri.PodSandboxStateValue(state=cri.SANDBOX_READY))), timeout=client.timeout).items
    for pod in pods:
        if (pod.metadata.name, pod.metadata.namespace, pod.metadata.uid, pod.metadata.attempt) == \
                (m.name, m.namespace, m.uid, m.attempt):
            return pod.id
    return ""


def _has_containers(client: Client, pod_id: str) -> bool:
    return any(c.state == cri.CONTAINER_RUNNING for c in containers_in_pod(client, pod_id))
