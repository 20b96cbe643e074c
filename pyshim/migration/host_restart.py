"""Host restart without losing containers: `pyshim node checkpoint-all` and `pyshim node restore-all`.

checkpoint-all, run before the daemon and the host stop, checkpoints every running container
(stopping it once its archive is complete), records its pod's config, IP and MAC in a manifest, and
removes the pods whose containers are all saved: their addresses are released, so that they can be
asked for again. restore-all, run when the daemon is back, recreates each pod with the same config
and the same IP and MAC (the `io.pyshim.network.*` annotations) and restores its containers into it.
Because the pod's address is the same, established TCP connections to peers outside the pod are
restored too (CRIU's network lock kept peers from seeing a reset while the pod was away).

A container whose checkpoint fails keeps running and is reported; a pod that cannot be restored
keeps its entry and archives in the manifest, so that restore-all can be run again.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cri_api import api_pb2 as cri
from pyshim.client import Client
from pyshim.internal.atomic import write_json_atomic
from pyshim.migration.workload import (MoveError, Workload, capture, checkpoint_and_stop, container_config_from,
                                       containers_in_pod, describe, pod_config_with_address, remove_quietly)

DEFAULT_DIR = "/var/lib/pyshim-host-restart"
MANIFEST = "manifest.json"


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
        self.saved: list[SavedContainer] = []

    def load(self) -> "Manifest":
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return self
        self.saved = [SavedContainer(Workload.from_json(e["workload"]), e["archive"]) for e in doc["containers"]]
        return self

    def save(self) -> None:
        doc = {"containers": [{"workload": s.workload.to_json(), "archive": s.archive} for s in self.saved]}
        write_json_atomic(self.path, doc, mode=0o600)

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
    saved_pods: dict[str, bool] = {}
    for container in running:
        try:
            workload = capture(client, container.id)
            archive = directory / f"{container.id}.tar"
            checkpoint_and_stop(client, container.id, str(archive), timeout)
        except MoveError as e:
            outcome.failed.append(f"{container.id}: {e} (it keeps running)")
            saved_pods[container.pod_sandbox_id] = False
            continue
        manifest.saved.append(SavedContainer(workload, str(archive)))
        manifest.save()
        saved_pods.setdefault(container.pod_sandbox_id, True)
        outcome.done.append(f"{workload.pod_config.metadata.name}/{workload.name} ({container.id}) -> {archive}")
    for pod_id, all_saved in saved_pods.items():
        if all_saved:
            # Frees the pod's address (CNI DEL), which its restored self asks for again.
            try:
                client.stop_pod(pod_id)
                client.remove_pod(pod_id)
            except grpc.RpcError as e:
                outcome.failed.append(f"pod {pod_id}: saved, but removing it failed: {describe(e)}")
    return outcome


def restore_all(client: Client, directory: Path) -> Outcome:
    manifest = Manifest(directory).load()
    outcome = Outcome()
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
    if not manifest.saved:
        manifest.path.unlink(missing_ok=True)
    return outcome


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
