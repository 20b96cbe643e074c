"""Exec, Attach and PortForward: check the request, then hand out a URL of the streaming server.

The streaming itself happens when the client (kubelet, crictl, `pyshim exec -it`) connects to the URL;
the URL's token is single-use and expires (see pyshim.streaming).
"""
from __future__ import annotations

from cri_api import api_pb2 as cri
from pyshim.errors import FailedPrecondition, InvalidArgument
from pyshim.internal.state import ContainerState, SandboxState
from pyshim.server.runtime import Runtime
from pyshim.streaming.server import AttachRequest, ExecRequest, PortForwardRequest


def _server(rt: Runtime):
    server = rt.streaming
    if server is None:
        raise FailedPrecondition("the streaming server is not running")
    return server


def _check_streams(request, call: str) -> None:
    if request.tty and request.stderr:
        raise InvalidArgument(f"{call}: tty and stderr cannot both be true")
    if not (request.stdin or request.stdout or request.stderr):
        raise InvalidArgument(f"{call}: one of stdin, stdout, or stderr must be set")


def _running(rt: Runtime, container_id: str, call: str):
    record = rt.containers.get(container_id)
    if record.state != ContainerState.RUNNING:
        raise FailedPrecondition(f"container {record.id} is {record.state.value}: {call} needs a running container")
    return record


def exec_(rt: Runtime, request) -> "cri.ExecResponse":
    if not request.cmd:
        raise InvalidArgument("exec: the command is empty")
    _check_streams(request, "exec")
    record = _running(rt, request.container_id, "exec")
    url = _server(rt).url_for(ExecRequest(record.id, list(request.cmd), tty=request.tty, stdin=request.stdin,
                                          stdout=request.stdout, stderr=request.stderr))
    return cri.ExecResponse(url=url)


def attach(rt: Runtime, request) -> "cri.AttachResponse":
    _check_streams(request, "attach")
    record = _running(rt, request.container_id, "attach")
    url = _server(rt).url_for(AttachRequest(record.id, tty=request.tty, stdin=request.stdin,
                                            stdout=request.stdout, stderr=request.stderr))
    return cri.AttachResponse(url=url)


def port_forward(rt: Runtime, request) -> "cri.PortForwardResponse":
    record = rt.sandboxes.get(request.pod_sandbox_id)
    if record.state != SandboxState.READY:
        raise FailedPrecondition(f"pod {record.id} is not ready")
    for port in request.port:
        if not 0 < port < 65536:
            raise InvalidArgument(f"port-forward: invalid port {port}")
    url = _server(rt).url_for(PortForwardRequest(record.id, list(request.port)))
    return cri.PortForwardResponse(url=url)
