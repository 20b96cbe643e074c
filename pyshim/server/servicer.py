"""Binds the CRI handlers to the generated gRPC services, and turns exceptions into gRPC statuses.

This is the only place that knows about gRPC contexts: handlers take (runtime, request) and return a
response or raise a domain error (pyshim.errors, the CNI adapter's, oci's, criu_glue's), which
status_of maps to the status a client sees.
"""
from __future__ import annotations

import functools
import logging
import time

import grpc

from cri_api import api_pb2_grpc
from criu_glue.errors import ArchiveError, UnsafeArchive
from oci import errors as oci_errors
from oci.runtime_spec import SpecInputError
from pyshim import errors
from pyshim.internal.cni import CNIPluginBusy, CNIPluginError
from pyshim.server import (container_checkpoint, container_events, container_lifecycle, container_ops, container_status,
                           container_streaming, images, pod_checkpoint, pod_restore, pod_sandbox, runtime_info,
                           stats)
from pyshim.server.runtime import Runtime

log = logging.getLogger("pyshim.cri")

# The one mapping from domain errors to what a CRI client sees. An error takes the code of the
# nearest class in its MRO that is listed here; anything unlisted is INTERNAL.
STATUS_CODES: dict[type, grpc.StatusCode] = {
    errors.CRIError: grpc.StatusCode.INTERNAL,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.Internal: grpc.StatusCode.INTERNAL,
    # A plugin refused to attach the pod (address outside the range or taken, bad plugin
    # configuration): the node cannot do what was asked until something changes.
    CNIPluginError: grpc.StatusCode.FAILED_PRECONDITION,
    # A plugin timed out or said "try again later" (CNI error 11).
    CNIPluginBusy: grpc.StatusCode.UNAVAILABLE,
    SpecInputError: grpc.StatusCode.INVALID_ARGUMENT,
    UnsafeArchive: grpc.StatusCode.INVALID_ARGUMENT,
    ArchiveError: grpc.StatusCode.FAILED_PRECONDITION,
    oci_errors.ImageNotFound: grpc.StatusCode.NOT_FOUND,
    oci_errors.InvalidReference: grpc.StatusCode.INVALID_ARGUMENT,
    oci_errors.RegistryError: grpc.StatusCode.UNAVAILABLE,
    oci_errors.ImageError: grpc.StatusCode.INTERNAL,
}


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a client sees for an exception raised by a handler."""
    for cls in type(error).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            message = getattr(error, "message", None)
            return code, message if isinstance(message, str) else str(error)
    return grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"


def unary(handler, with_deadline: bool = False, with_metadata: bool = False):
    """A unary CRI method from a handler(runtime, request), or (runtime, request, seconds_remaining)
    for handlers that must honour the caller's deadline; `with_metadata` adds the call's `pyshim-*`
    gRPC metadata as a dict (pyshim's own options on a standard call, which kubelet never sends)."""
    name = handler.__name__

    @functools.wraps(handler)
    def method(self, request, context):
        started = time.monotonic()
        try:
            args = [self.runtime, request]
            if with_deadline:
                args.append(context.time_remaining())
            if with_metadata:
                args.append(pyshim_metadata(context))
            response = handler(*args)
        except Exception as e:  # noqa: BLE001 - every failure must reach the client as a status
            code, message = status_of(e)
            level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
            log.log(level, "CRI call failed", exc_info=code == grpc.StatusCode.INTERNAL,
                    extra={"call": name, "code": code.name, "error": message})
            context.abort(code, message)
        log.debug("CRI call", extra={"call": name, "ms": round((time.monotonic() - started) * 1000, 2)})
        return response

    return method


def pyshim_metadata(context) -> dict[str, str]:
    return {key: value for key, value in (context.invocation_metadata() or ())
            if key.startswith("pyshim-") and isinstance(value, str)}


class RuntimeService(api_pb2_grpc.RuntimeServiceServicer):
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    Version = unary(runtime_info.version)
    Status = unary(runtime_info.status)
    RuntimeConfig = unary(runtime_info.runtime_config)
    UpdateRuntimeConfig = unary(runtime_info.update_runtime_config)

    RunPodSandbox = unary(pod_sandbox.run_pod_sandbox)
    StopPodSandbox = unary(pod_sandbox.stop_pod_sandbox)
    RemovePodSandbox = unary(pod_sandbox.remove_pod_sandbox)
    PodSandboxStatus = unary(pod_sandbox.pod_sandbox_status)
    ListPodSandbox = unary(pod_sandbox.list_pod_sandbox)

    CreateContainer = unary(container_lifecycle.create_container)
    StartContainer = unary(container_lifecycle.start_container)
    StopContainer = unary(container_lifecycle.stop_container)
    RemoveContainer = unary(container_lifecycle.remove_container)
    ContainerStatus = unary(container_status.container_status)
    ListContainers = unary(container_status.list_containers)

    ExecSync = unary(container_ops.exec_sync)
    UpdateContainerResources = unary(container_ops.update_container_resources)
    ReopenContainerLog = unary(container_ops.reopen_container_log, with_deadline=True)
    Exec = unary(container_streaming.exec_)
    Attach = unary(container_streaming.attach)
    PortForward = unary(container_streaming.port_forward)

    CheckpointContainer = unary(container_checkpoint.checkpoint_container, with_deadline=True,
                                with_metadata=True)
    CheckpointPod = unary(pod_checkpoint.checkpoint_pod, with_deadline=True, with_metadata=True)
    RestorePod = unary(pod_restore.restore_pod, with_deadline=True)

    ContainerStats = unary(stats.container_stats)
    ListContainerStats = unary(stats.list_container_stats)
    PodSandboxStats = unary(stats.pod_sandbox_stats)
    ListPodSandboxStats = unary(stats.list_pod_sandbox_stats)

    def GetContainerEvents(self, request, context):
        yield from container_events.get_container_events(self.runtime, request, context.is_active)


class ImageService(api_pb2_grpc.ImageServiceServicer):
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    ListImages = unary(images.list_images)
    ImageStatus = unary(images.image_status)
    PullImage = unary(images.pull_image)
    RemoveImage = unary(images.remove_image)
    ImageFsInfo = unary(images.image_fs_info)
