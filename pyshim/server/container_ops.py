"""ExecSync, UpdateContainerResources, ReopenContainerLog (Exec, Attach and PortForward: container_streaming)."""
from __future__ import annotations

from cri_api import api_pb2 as cri
from pyshim.server.runtime import Runtime


def exec_sync(rt: Runtime, request) -> "cri.ExecSyncResponse":
    """Run a command in a running container; DEADLINE_EXCEEDED when it outlives `timeout` seconds."""
    result = rt.containers.exec_sync(request.container_id, list(request.cmd), request.timeout)
    return cri.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code)


def update_container_resources(rt: Runtime, request) -> "cri.UpdateContainerResourcesResponse":
    if request.HasField("linux"):
        rt.containers.update_resources(request.container_id, request.linux)
    else:
        rt.containers.get(request.container_id)
    return cri.UpdateContainerResourcesResponse()


# Without a gRPC deadline, how long conmon may take to put the new log file in place.
REOPEN_LOG_TIMEOUT = 10.0


def reopen_container_log(rt: Runtime, request, time_remaining: float | None) -> "cri.ReopenContainerLogResponse":
    """Reopen the log after a rotation; answers only once the new log file exists, within the call's deadline."""
    timeout = REOPEN_LOG_TIMEOUT if time_remaining is None else max(0.0, min(time_remaining, REOPEN_LOG_TIMEOUT))
    rt.containers.reopen_log(request.container_id, timeout)
    return cri.ReopenContainerLogResponse()
