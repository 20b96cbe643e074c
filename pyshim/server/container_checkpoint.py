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
from criu_glue import archive_format as fmt
from criu_glue import portable_archive as portable
from pyshim.annotations import (CHECKPOINT_ARCHIVE_KEY, CHECKPOINT_ARCHIVE_KINDS, CHECKPOINT_MODE_KEY, CHECKPOINT_MODES,
                                LAZY_CHECKPOINT_MODES)
from pyshim.errors import InvalidArgument
from pyshim.internal import netns
from pyshim.checkpoint_restore.restore import POD_IPS_KEY
from pyshim.checkpoint_restore.checkpoint import ArchiveMembers, bind_mount_of, diff_exclusions, validate_location
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


def _base_image_fields(rt: Runtime, record) -> dict:
    """The image the container's rootfs is built on. rootfsImageRef is NAME@DIGEST where known
    (containerd's form, which it pulls): another node pulls exactly this image to restore on. Else
    it is the image ID as bare hex, the only form CRI-O accepts there. A restored container's base is
    the image under its checkpoint, not the checkpoint image itself."""
    if not record.base_image_id:
        image = rt.images.get(record.image_id)
        ref = image.repo_digests[0] if image is not None and image.repo_digests else _bare(record.image_id)
        return {"rootfs_image": record.image_ref, "rootfs_image_ref": ref, "rootfs_image_name": record.image_name}
    image = rt.images.get(record.base_image_id)
    if image is None:
        return {"rootfs_image_ref": _bare(record.base_image_id)}
    name = (image.repo_tags or image.repo_digests or [image.id])[0]
    ref = image.repo_digests[0] if image.repo_digests else _bare(image.id)
    return {"rootfs_image": name, "rootfs_image_ref": ref, "rootfs_image_name": name}


def _bare(image_id: str) -> str:
    return image_id.removeprefix("sha256:")


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
    """What a container's archive holds besides CRIU's images and the diff (also CheckpointPod's parts)."""
    config = rt.containers.config_of(record)
    spec = rt.containers.spec_of(record)
    return ArchiveMembers(
        config=fmt.CheckpointConfig(
            id=record.id, name=config.metadata.name, **_base_image_fields(rt, record), runtime="runc",
            created_time_ns=record.created_at, checkpointed_time_ns=time.time_ns(),
            # "engine" tells pyshim's archives apart from containerd's, whose annotations they share;
            # the pod's addresses decide at restore whether established TCP connections can live on;
            # libpod's keys let Podman restore the archive too.
            extra={"engine": "pyshim",
                   POD_IPS_KEY: [ip for ip in ([sandbox.ip, *sandbox.additional_ips] if sandbox else []) if ip],
                   **portable.libpod_config_fields(spec, record.base_image_id or record.image_id)}),
        spec=portable.portable_spec(spec, [m.container_path for m in config.mounts], config.annotations),
        status=convert.container_status(record, config),  # written in containerd's Go form
        bind_mounts=[bind_mount_of(m.host_path, m.container_path) for m in config.mounts],
        log_path=record.log_path,
        diff_exclusions=diff_exclusions([m.container_path for m in config.mounts]),
    )


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
