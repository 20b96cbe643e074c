"""CheckpointPod (cri-api v0.37, KEP-5823): a consistent checkpoint of selected containers of a pod.

Thin: validate everything before anything is frozen, hand the containers to the engine
(pyshim/checkpoint_restore/pod_checkpoint.py), respond. The caller must set a deadline (the CRI contract
says so; a call without one is refused rather than left to run unbounded). `options` keys are
pyshim's, documented in the README (`compression`, `tcp`); unknown keys or values are refused.

As for CheckpointContainer, gRPC metadata `pyshim-checkpoint-mode: stop` (sent by `pyshim migrate
--pod` and `pyshim node checkpoint-all`, never by kubelet) stops the containers once the checkpoint is
complete instead of resuming them; each then shows EXITED with reason "Checkpointed".
"""
from __future__ import annotations

import time

from google.protobuf import json_format

from cri_api import api_pb2 as cri
from pyshim.errors import FailedPrecondition, InvalidArgument, NotFound
from pyshim.checkpoint_restore.pod_checkpoint import PodCheckpointOptions, PodPart, validate_output_dir, validate_selection
from pyshim.checkpoint_restore.checkpoint import CheckpointResult
from pyshim.internal import netns
from pyshim.internal.state import SandboxState
from pyshim.server.container_checkpoint import _stop_requested, archive_members
from pyshim.server.runtime import Runtime


# gRPC reports a call without a deadline as one in the infinite future; anything beyond this is that.
NO_DEADLINE_SECONDS = 10 * 365 * 86400


def caller_deadline(time_remaining: float | None, call: str) -> float:
    """The caller's deadline as time.monotonic(); the pod calls require one (the CRI says so)."""
    if time_remaining is None or time_remaining > NO_DEADLINE_SECONDS:
        raise InvalidArgument(f"{call}: the call has no deadline; set one (the CRI requires it)")
    return time.monotonic() + time_remaining


def checkpoint_pod(rt: Runtime, request, time_remaining: float | None,
                   metadata: dict[str, str] | None = None) -> "cri.CheckpointPodResponse":
    deadline = caller_deadline(time_remaining, "CheckpointPod")
    rt.checkpointer.check_enabled()
    stop = _stop_requested(metadata or {})
    if not request.pod_sandbox_id:
        raise InvalidArgument("CheckpointPod: pod_sandbox_id is empty")
    sandbox = rt.sandboxes.find(request.pod_sandbox_id)
    if sandbox is None:
        raise NotFound(f"pod sandbox {request.pod_sandbox_id!r} not found")
    if sandbox.state != SandboxState.READY:
        raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready: only a running pod can be checkpointed")
    options = PodCheckpointOptions.parse(dict(request.options))
    records = validate_selection(sandbox.id, list(request.container_ids), rt.containers.find)
    for record in records:
        rt.restores.refuse_while_pages_arrive(record)
    output = validate_output_dir(request.output_path)
    parts = []
    for record in records:
        config = rt.containers.config_of(record)
        parts.append(PodPart(record=record, name=config.metadata.name,
                             config_doc=json_format.MessageToDict(config), members=archive_members(rt, record, sandbox)))
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise FailedPrecondition(f"CheckpointPod: the selected containers' names are not unique ({names}); "
                                 "RestorePod matches containers by name")
    pod_config = json_format.MessageToDict(rt.sandboxes.config_of(sandbox))
    pod_ips = [ip for ip in (sandbox.ip, *sandbox.additional_ips) if ip]
    netns_path = str(netns.netns_path(sandbox.netns_name)) if sandbox.netns_name else ""
    result = rt.pod_checkpointer.checkpoint(sandbox.id, pod_config, pod_ips, parts, output, options, deadline,
                                            stop=stop, netns_path=netns_path)
    for entry, record in zip(result.manifest.containers, records):
        if stop:  # each container's end, reason "Checkpointed", and the figures (verbose lastCheckpoint)
            part = output / entry.part
            rt.containers.note_checkpoint(record.id, CheckpointResult(
                part, result.frozen_seconds, result.total_seconds, part.stat().st_size,
                result.tcp.get(record.id, False), True, result.phases_ms))
        else:
            rt.containers.refresh(record)
    return cri.CheckpointPodResponse()
