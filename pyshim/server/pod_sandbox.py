"""RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus, ListPodSandbox."""
from __future__ import annotations

import json
import time

from google.protobuf import json_format

from cri_api import api_pb2 as cri
from pyshim.errors import InvalidArgument
from pyshim.server import convert
from pyshim.server.runtime import Runtime

# kubelet waits this long for a pod's containers to end when it stops the pod.
_STOP_GRACE_SECONDS = 10


def run_pod_sandbox(rt: Runtime, request) -> "cri.RunPodSandboxResponse":
    """Create and start a pod: its namespaces, network, files and cgroup. Ready when this returns."""
    if not request.HasField("config"):
        raise InvalidArgument("RunPodSandbox: config is missing")
    if request.runtime_handler not in ("", "runc"):
        raise InvalidArgument(f"runtime handler {request.runtime_handler!r} is not configured (only runc)")
    record = rt.sandboxes.run(request.config, request.runtime_handler)
    return cri.RunPodSandboxResponse(pod_sandbox_id=record.id)


def stop_pod_sandbox(rt: Runtime, request) -> "cri.StopPodSandboxResponse":
    """Stop every container of the pod, then release its network. Stopping a stopped or removed pod succeeds."""
    record = rt.sandboxes.find(request.pod_sandbox_id)
    if record is None:
        return cri.StopPodSandboxResponse()
    for container in rt.containers.in_sandbox(record.id):
        rt.containers.stop(container.id, _STOP_GRACE_SECONDS)
    rt.sandboxes.stop(record.id)
    return cri.StopPodSandboxResponse()


def remove_pod_sandbox(rt: Runtime, request) -> "cri.RemovePodSandboxResponse":
    """Forcibly remove the pod's containers and then the pod. Removing a removed pod succeeds."""
    record = rt.sandboxes.find(request.pod_sandbox_id)
    if record is None:
        return cri.RemovePodSandboxResponse()
    for container in rt.containers.in_sandbox(record.id):
        rt.containers.remove(container.id)
    rt.sandboxes.remove(record.id)
    return cri.RemovePodSandboxResponse()


def pod_sandbox_status(rt: Runtime, request) -> "cri.PodSandboxStatusResponse":
    record = rt.sandboxes.get(request.pod_sandbox_id)
    config = rt.sandboxes.config_of(record)
    info = {}
    if request.verbose:
        info["info"] = json.dumps({
            "netns": record.netns_name, "cgroupParent": record.cgroup_parent, "hostname": record.hostname,
            "pidInfra": record.pid_infra, "network": record.network,
            "config": json_format.MessageToDict(config),
        })
    return cri.PodSandboxStatusResponse(status=convert.pod_sandbox_status(record, config), info=info,
                                        timestamp=time.time_ns())


def list_pod_sandbox(rt: Runtime, request) -> "cri.ListPodSandboxResponse":
    f = request.filter if request.HasField("filter") else None
    items = []
    for record in rt.sandboxes.all():
        if f is not None:
            if f.id and not record.id.startswith(f.id):
                continue
            if f.HasField("state") and convert.SANDBOX_STATE[record.state] != f.state.state:
                continue
        config = rt.sandboxes.config_of(record)
        if f is not None and not convert.labels_match(f.label_selector, config.labels):
            continue
        items.append(convert.pod_sandbox(record, config))
    return cri.ListPodSandboxResponse(items=items)
