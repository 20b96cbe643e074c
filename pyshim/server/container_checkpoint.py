"""CheckpointContainer: a forensic checkpoint archive of a running container, which keeps running.

kubelet's checkpoint API (POST /checkpoint/{namespace}/{pod}/{container}) calls this with
`location` = <kubelet root>/checkpoints/checkpoint-<pod>_<namespace>-<container>-<time>.tar.
"""
from __future__ import annotations

import time

from google.protobuf import json_format

from cri_api import api_pb2 as cri
from criu_glue import archive_format as fmt
from pyshim.internal.checkpointer import ArchiveMembers, bind_mount_of, diff_exclusions, validate_location
from pyshim.server import convert
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


def checkpoint_container(rt: Runtime, request, time_remaining: float | None) -> "cri.CheckpointContainerResponse":
    rt.checkpointer.check_enabled()
    record = rt.containers.get(request.container_id)
    location = validate_location(request.location)
    deadline = _deadline(request.timeout, time_remaining)
    config = rt.containers.config_of(record)
    members = ArchiveMembers(
        config=fmt.CheckpointConfig(
            id=record.id, name=config.metadata.name, rootfs_image=record.image_ref,
            rootfs_image_ref=record.image_id, rootfs_image_name=record.image_name, runtime="runc",
            created_time_ns=record.created_at, checkpointed_time_ns=time.time_ns(),
            # Tells pyshim's archives apart from containerd's, whose annotations they share.
            extra={"engine": "pyshim"}),
        spec=rt.containers.spec_of(record),
        status=json_format.MessageToDict(convert.container_status(record, config)),
        bind_mounts=[bind_mount_of(m.host_path, m.container_path) for m in config.mounts],
        log_path=record.log_path,
        diff_exclusions=diff_exclusions([m.container_path for m in config.mounts]),
    )
    result = rt.checkpointer.checkpoint(record, members, location, deadline)
    rt.containers.note_checkpoint(record.id, str(result.location))
    return cri.CheckpointContainerResponse()
