"""A container and its pod as a CRI client sees them: enough to create them again elsewhere."""
from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
from google.protobuf import json_format

from cri_api import api_pb2 as cri
from pyshim.client import Client
from pyshim.annotations import CHECKPOINT_ARCHIVE_KEY, CHECKPOINT_MODE_KEY, POD_IP_ANNOTATION, POD_MAC_ANNOTATION

CHECKPOINT_MODE_METADATA = ((CHECKPOINT_MODE_KEY, "stop"),)


class MoveError(Exception):
    """A step of a move failed; the message says which step, on which node, and why."""


@dataclass
class Workload:
    """One container of one pod, with the configs they were created with."""
    container_id: str
    pod_id: str
    container_config: "cri.ContainerConfig"
    pod_config: "cri.PodSandboxConfig"
    pod_ip: str
    pod_mac: str
    state: int  # cri.ContainerState
    base_image: str  # NAME@DIGEST of the image under the container's rootfs, "" if unknown

    @property
    def name(self) -> str:
        return self.container_config.metadata.name

    def to_json(self) -> dict:
        return {"containerId": self.container_id, "podId": self.pod_id,
                "containerConfig": json_format.MessageToDict(self.container_config),
                "podConfig": json_format.MessageToDict(self.pod_config),
                "podIp": self.pod_ip, "podMac": self.pod_mac, "state": self.state, "baseImage": self.base_image}

    @classmethod
    def from_json(cls, doc: dict) -> "Workload":
        return cls(container_id=doc["containerId"], pod_id=doc["podId"],
                   container_config=json_format.ParseDict(doc["containerConfig"], cri.ContainerConfig()),
                   pod_config=json_format.ParseDict(doc["podConfig"], cri.PodSandboxConfig()),
                   pod_ip=doc.get("podIp", ""), pod_mac=doc.get("podMac", ""), state=doc.get("state", 0),
                   base_image=doc.get("baseImage", ""))


def describe(error: grpc.RpcError) -> str:
    code = error.code().name if hasattr(error, "code") and error.code() else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{code}: {details}"


def capture(client: Client, container_id: str) -> Workload:
    """Read a container's and its pod's configs from pyshim's verbose status info."""
    try:
        status = client.status(container_id, verbose=True)
    except grpc.RpcError as e:
        raise MoveError(f"container {container_id} on {client.endpoint}: {describe(e)}") from None
    info = json.loads(status.info.get("info", "{}"))
    if "config" not in info:
        raise MoveError(f"{client.endpoint} does not report container configs (not a pyshim daemon, or an "
                        f"older one): cannot move container {container_id}")
    pod_id = info["sandboxID"]
    pod_status = client.pod_status(pod_id, verbose=True)
    pod_info = json.loads(pod_status.info.get("info", "{}"))
    network = pod_info.get("network") or {}
    return Workload(
        container_id=status.status.id, pod_id=pod_id,
        container_config=json_format.ParseDict(info["config"], cri.ContainerConfig()),
        pod_config=json_format.ParseDict(pod_info["config"], cri.PodSandboxConfig()),
        pod_ip=pod_status.status.network.ip, pod_mac=network.get("mac", ""), state=status.status.state,
        base_image=_base_image_ref(client, info.get("baseImage") or status.status.image_ref))


def _base_image_ref(client: Client, image: str) -> str:
    """NAME@DIGEST of the image, so that another node pulls exactly the same content."""
    if not image:
        return ""
    try:
        found = client.images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=image)),
                                          timeout=client.timeout).image
    except grpc.RpcError:
        return ""
    return found.repo_digests[0] if found.repo_digests else ""


def container_info(client: Client, container_id: str) -> tuple["cri.ContainerStatus", dict]:
    status = client.status(container_id, verbose=True)
    return status.status, json.loads(status.info.get("info", "{}"))


def checkpoint_and_stop(client: Client, container_id: str, location: str, timeout: float,
                        throwaway_archive: bool = False) -> dict:
    """CheckpointContainer that stops the container once the archive is complete; returns the
    daemon's figures for it (lastCheckpoint of the verbose status). `throwaway_archive`: the archive
    need not survive a host crash (a move's), so the daemon skips its fsync."""
    metadata = CHECKPOINT_MODE_METADATA + (((CHECKPOINT_ARCHIVE_KEY, "throwaway"),) if throwaway_archive else ())
    try:
        client.runtime.CheckpointContainer(
            cri.CheckpointContainerRequest(container_id=container_id, location=location),
            timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        raise MoveError(f"checkpoint of {container_id} on {client.endpoint}: {describe(e)}") from None
    return container_info(client, container_id)[1].get("lastCheckpoint", {})


def pod_config_with_address(pod_config, ip: str, mac: str):
    """The pod config asking the network for a fixed address (a host restart keeps addresses)."""
    config = cri.PodSandboxConfig()
    config.CopyFrom(pod_config)
    if ip:
        config.annotations[POD_IP_ANNOTATION] = ip
    if mac:
        config.annotations[POD_MAC_ANNOTATION] = mac
    return config


def container_config_from(config, image: str):
    """The container's config with a checkpoint (archive path or checkpoint image) as its image."""
    restored = cri.ContainerConfig()
    restored.CopyFrom(config)
    restored.image.CopyFrom(cri.ImageSpec(image=image))
    return restored


def containers_in_pod(client: Client, pod_id: str) -> list:
    return list(client.runtime.ListContainers(
        cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id)), timeout=client.timeout).containers)


def remove_quietly(client: Client, container_id: str = "", pod_id: str = "") -> None:
    """Best-effort removal during a rollback: the first failure must stay the one reported."""
    try:
        if container_id:
            client.remove(container_id)
        if pod_id:
            client.stop_pod(pod_id)
            client.remove_pod(pod_id)
    except grpc.RpcError:
        pass
