"""CheckpointContainer: a forensic checkpoint archive of a running container, which keeps running.

kubelet's checkpoint API (POST /checkpoint/{namespace}/{pod}/{container}) calls this with
`location` = <kubelet root>/checkpoints/checkpoint-<pod>_<namespace>-<container>-<time>.tar.

pyshim's own option, as gRPC metadata on the standard call (`pyshim migrate` and the host-restart
commands send it; kubelet never does): `pyshim-checkpoint-mode: stop` stops the container once its
archive is complete, as Podman's checkpoint without --leave-running does, so that a move never runs
the same process in two places. ContainerStatus (verbose) then shows reason "Checkpointed" and the
checkpoint's figures under `lastCheckpoint`, with the archive's digest and size (`archive`), computed
as it was written. `pyshim-checkpoint-archive: throwaway` (a move's archive) skips its fsync.
"""
from __future__ import annotations

import time

from cri_api import api_pb2 as cri
from pyshim.annotations import (CHECKPOINT_ARCHIVE_KEY, CHECKPOINT_ARCHIVE_KINDS, CHECKPOINT_MODE_KEY, CHECKPOINT_MODES,
                                LAZY_CHECKPOINT_MODES)
from pyshim.errors import InvalidArgument
from pyshim.internal import netns
from pyshim.checkpoint_restore.archive_members import archive_members as build_archive_members
from pyshim.checkpoint_restore.checkpoint import ArchiveMembers, validate_location
from pyshim.server import convert
from pyshim.server.container_lazy_checkpoint import lazy_checkpoint
from pyshim.server.runtime import Runtime

# With neither a request timeout nor a gRPC deadline, a checkpoint still must not hang forever.
DEFAULT_TIMEOUT_SECONDS = 600


def _deadline(request_timeout: int, time_remaining: float | None) -> float:
    limits = [DEFAULT_TIMEOUT_SECONDS]
    if request_timeout > 0:
        limits.append(request_timeout)
    if time_remaining is not None:
        limits.append(time_remaining)
    return time.monotonic() + min(limits)


def _checkpoint_mode(metadata: dict[str, str]) -> str:
    mode = metadata.get(CHECKPOINT_MODE_KEY, "leave-running")
    if mode not in CHECKPOINT_MODES:
        raise InvalidArgument(f"gRPC metadata {CHECKPOINT_MODE_KEY}={mode!r}: want one of {CHECKPOINT_MODES}")
    return mode


def _stop_requested(metadata: dict[str, str]) -> bool:
    mode = _checkpoint_mode(metadata)
    if mode in LAZY_CHECKPOINT_MODES:
        raise InvalidArgument(f"gRPC metadata {CHECKPOINT_MODE_KEY}={mode!r} is for CheckpointContainer only")
    return mode == "stop"


def _durable_requested(metadata: dict[str, str]) -> bool:
    kind = metadata.get(CHECKPOINT_ARCHIVE_KEY, "durable")
    if kind not in CHECKPOINT_ARCHIVE_KINDS:
        raise InvalidArgument(f"gRPC metadata {CHECKPOINT_ARCHIVE_KEY}={kind!r}: want one of {CHECKPOINT_ARCHIVE_KINDS}")
    return kind == "durable"


def archive_members(rt: Runtime, record, sandbox) -> ArchiveMembers:
    """What a container's archive holds besides CRIU's images and the diff (also CheckpointPod's parts);
    the engine builds them, with the server's CRI status conversion."""
    return build_archive_members(rt.containers, rt.images, record, sandbox, status_of=convert.container_status)


def checkpoint_container(rt: Runtime, request, time_remaining: float | None,
                         metadata: dict[str, str]) -> "cri.CheckpointContainerResponse":
    rt.checkpointer.check_enabled()
    mode = _checkpoint_mode(metadata)
    durable = _durable_requested(metadata)
    if mode in LAZY_CHECKPOINT_MODES:  # `pyshim migrate --lazy`: container_lazy_checkpoint.py
        return lazy_checkpoint(rt, request, mode, _deadline(request.timeout, time_remaining), durable, metadata)
    stop = mode == "stop"
    record = rt.containers.get(request.container_id)
    rt.restores.refuse_while_pages_arrive(record)
    rt.lazy_checkpoints.refuse_while_dumped(record.id)
    location = validate_location(request.location)
    deadline = _deadline(request.timeout, time_remaining)
    sandbox = rt.sandboxes.find(record.sandbox_id)
    members = archive_members(rt, record, sandbox)
    netns_path = str(netns.netns_path(sandbox.netns_name)) if sandbox and sandbox.netns_name else ""
    result = rt.checkpointer.checkpoint(record, members, location, deadline, stop=stop, netns_path=netns_path,
                                        durable=durable)
    rt.containers.note_checkpoint(record.id, result)
    return cri.CheckpointContainerResponse()
