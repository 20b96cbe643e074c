"""CreateContainer, StartContainer, StopContainer, RemoveContainer."""
from __future__ import annotations

from cri_api import api_pb2 as cri
from pyshim.errors import InvalidArgument, NotFound
from pyshim.internal.container_manager import SandboxContext
from pyshim.server.runtime import Runtime


def create_container(rt: Runtime, request) -> "cri.CreateContainerResponse":
    """Create a container in a ready pod: rootfs, OCI config, and `runc create` under conmon."""
    if not request.HasField("config"):
        raise InvalidArgument("CreateContainer: config is missing")
    sandbox = rt.sandboxes.find(request.pod_sandbox_id)
    if sandbox is None:
        raise NotFound(f"pod sandbox {request.pod_sandbox_id!r} not found")
    # kubelet sends the pod's config again; ours is the one the pod was created with.
    sandbox_config = rt.sandboxes.config_of(sandbox)
    config = request.config
    ns_options = config.linux.security_context.namespace_options
    target_pid = ""
    if ns_options.pid == cri.NamespaceMode.TARGET:
        target_pid = rt.containers.pid_namespace_path(ns_options.target_id)
    context = SandboxContext(
        record=sandbox, config=sandbox_config,
        namespaces=rt.sandboxes.container_namespaces(sandbox, ns_options, target_pid),
        files=rt.sandboxes.container_files(sandbox),
    )
    record = rt.containers.create(context, config)
    return cri.CreateContainerResponse(container_id=record.id)


def start_container(rt: Runtime, request) -> "cri.StartContainerResponse":
    rt.containers.start(request.container_id)
    return cri.StartContainerResponse()


def stop_container(rt: Runtime, request) -> "cri.StopContainerResponse":
    """SIGTERM (or the image's StopSignal), SIGKILL after `timeout` seconds. Stopping a stopped container succeeds."""
    if rt.containers.find(request.container_id) is None:
        raise NotFound(f"container {request.container_id!r} not found")
    rt.containers.stop(request.container_id, max(0, request.timeout))
    return cri.StopContainerResponse()


def remove_container(rt: Runtime, request) -> "cri.RemoveContainerResponse":
    """Remove a container, killing it if it runs. Removing a removed container succeeds."""
    rt.containers.remove(request.container_id)
    return cri.RemoveContainerResponse()
