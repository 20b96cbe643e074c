"""CreateContainer, StartContainer, StopContainer, RemoveContainer."""
from __future__ import annotations

from cri_api import api_pb2 as cri
from pyshim.errors import InvalidArgument, NotFound
from pyshim.internal.container_manager import SandboxContext
from pyshim.server.runtime import Runtime


def _sandbox_context(rt: Runtime, sandbox_id: str, config) -> SandboxContext:
    sandbox = rt.sandboxes.find(sandbox_id)
    if sandbox is None:
        raise NotFound(f"pod sandbox {sandbox_id!r} not found")
    ns_options = config.linux.security_context.namespace_options
    target_pid = ""
    if ns_options.pid == cri.NamespaceMode.TARGET:
        target_pid = rt.containers.pid_namespace_path(ns_options.target_id)
    # kubelet sends the pod's config again; ours is the one the pod was created with.
    return SandboxContext(
        record=sandbox, config=rt.sandboxes.config_of(sandbox),
        namespaces=rt.sandboxes.container_namespaces(sandbox, ns_options, target_pid),
        files=rt.sandboxes.container_files(sandbox),
    )


def create_container(rt: Runtime, request) -> "cri.CreateContainerResponse":
    """Create a container in a ready pod: rootfs, OCI config, and `runc create` under conmon.

    If the image is a checkpoint (an archive path, or a checkpoint image), only check the checkpoint
    here and record the container; StartContainer restores it."""
    if not request.HasField("config"):
        raise InvalidArgument("CreateContainer: config is missing")
    context = _sandbox_context(rt, request.pod_sandbox_id, request.config)
    source = rt.restores.source_of(request.config)
    if source is not None:
        record = rt.restores.create(context, request.config, source)
    else:
        record = rt.containers.create(context, request.config)
    return cri.CreateContainerResponse(container_id=record.id)


def start_container(rt: Runtime, request) -> "cri.StartContainerResponse":
    """Start a created container; a container created from a checkpoint is restored now."""
    record = rt.containers.get(request.container_id)
    from pyshim.server.pod_restore_start import held_part, start_with_pod  # RestorePod's (no cycle at import)

    def restore_with_pod(r) -> None:
        with held_part(r.id) as checkpoint:  # RestorePod's checked part, still open: not indexed again
            _restore(rt, r, cached=False, checkpoint=checkpoint)
    if start_with_pod(rt, record, restore_with_pod):
        pass  # restored with its pod, by this call or an earlier one
    elif record.pending_restore:
        try:
            _restore(rt, record)
        finally:
            from pyshim.server.pod_restore import after_restore_started  # RestorePod's pods (no cycle at import)
            after_restore_started(rt, record.sandbox_id)
    else:
        rt.containers.start(record.id)
    return cri.StartContainerResponse()


def _restore(rt: Runtime, record, cached: bool = True, checkpoint=None) -> None:
    context = _sandbox_context(rt, record.sandbox_id, rt.containers.config_of(record))
    rt.restores.start(record.id, context, cached=cached, checkpoint=checkpoint)


def stop_container(rt: Runtime, request) -> "cri.StopContainerResponse":
    """SIGTERM (or the image's StopSignal), SIGKILL after `timeout` seconds. Stopping a stopped, removed or
    unknown container succeeds: the CRI makes stop idempotent (containerd and CRI-O answer OK too), since
    kubelet retries it after timeouts and restarts without knowing what already happened."""
    _end_lazy_checkpoint(rt, request.container_id)
    rt.containers.stop(request.container_id, max(0, request.timeout))
    return cri.StopContainerResponse()


def remove_container(rt: Runtime, request) -> "cri.RemoveContainerResponse":
    """Remove a container, killing it if it runs. Removing a removed container succeeds."""
    _end_lazy_checkpoint(rt, request.container_id)
    rt.containers.remove(request.container_id)
    return cri.RemoveContainerResponse()


def _end_lazy_checkpoint(rt: Runtime, container_id: str) -> None:
    """A container frozen by a lazy checkpoint (migrate --lazy) cannot take a signal: end that first."""
    record = rt.containers.find(container_id) if rt.lazy_checkpoints else None
    if record is not None:
        rt.lazy_checkpoints.discard(record)
