"""From pyshim's records to CRI messages (the shapes kubelet and crictl read)."""
from __future__ import annotations

from cri_api import api_pb2 as cri
from pyshim.internal.state import ContainerRecord, ContainerState, SandboxRecord, SandboxState

SANDBOX_STATE = {SandboxState.READY: cri.SANDBOX_READY, SandboxState.NOTREADY: cri.SANDBOX_NOTREADY}
CONTAINER_STATE = {
    ContainerState.CREATED: cri.CONTAINER_CREATED,
    ContainerState.RUNNING: cri.CONTAINER_RUNNING,
    ContainerState.EXITED: cri.CONTAINER_EXITED,
    ContainerState.UNKNOWN: cri.CONTAINER_UNKNOWN,
}


def pod_sandbox(record: SandboxRecord, config) -> "cri.PodSandbox":
    return cri.PodSandbox(
        id=record.id, metadata=config.metadata, state=SANDBOX_STATE[record.state],
        created_at=record.created_at, labels=dict(config.labels), annotations=dict(config.annotations),
        runtime_handler=record.runtime_handler,
    )


def pod_sandbox_status(record: SandboxRecord, config) -> "cri.PodSandboxStatus":
    network = cri.PodSandboxNetworkStatus(
        ip=record.ip, additional_ips=[cri.PodIP(ip=ip) for ip in record.additional_ips])
    ns_options = config.linux.security_context.namespace_options
    return cri.PodSandboxStatus(
        id=record.id, metadata=config.metadata, state=SANDBOX_STATE[record.state],
        created_at=record.created_at, network=network,
        linux=cri.LinuxPodSandboxStatus(namespaces=cri.Namespace(options=ns_options)),
        labels=dict(config.labels), annotations=dict(config.annotations),
        runtime_handler=record.runtime_handler,
    )


def image_spec(record: ContainerRecord, config) -> "cri.ImageSpec":
    return cri.ImageSpec(image=record.image_name, annotations=dict(config.image.annotations),
                         user_specified_image=record.image_ref)


def container(record: ContainerRecord, config) -> "cri.Container":
    return cri.Container(
        id=record.id, pod_sandbox_id=record.sandbox_id, metadata=config.metadata,
        image=image_spec(record, config), image_ref=record.image_id, image_id=record.image_id,
        state=CONTAINER_STATE[record.state], created_at=record.created_at,
        labels=dict(config.labels), annotations=dict(config.annotations),
    )


def container_status(record: ContainerRecord, config) -> "cri.ContainerStatus":
    return cri.ContainerStatus(
        id=record.id, metadata=config.metadata, state=CONTAINER_STATE[record.state],
        created_at=record.created_at, started_at=record.started_at, finished_at=record.finished_at,
        exit_code=record.exit_code, image=image_spec(record, config), image_ref=record.image_id,
        image_id=record.image_id, reason=record.reason, message=record.message,
        labels=dict(config.labels), annotations=dict(config.annotations),
        mounts=list(config.mounts), log_path=record.log_path,
        resources=cri.ContainerResources(linux=config.linux.resources) if config.HasField("linux") else None,
    )


def labels_match(selector, labels) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
