"""What a container's checkpoint archive holds besides CRIU's images and the rootfs diff: config.dump,
spec.dump, status.dump, bind.mounts and the container log (CheckpointContainer's archive, and each
part of a CheckpointPod). Built from the container's record, its ContainerConfig and config.json, the
pod's addresses and the image store; the CRI status conversion is the server's, so the caller passes
it (`status_of(record, config)` -> cri.ContainerStatus, written in containerd's Go form)."""
from __future__ import annotations

import time
from typing import Callable

from criu_glue import archive_format as fmt
from criu_glue import portable_archive as portable
from pyshim.checkpoint_restore.checkpoint import ArchiveMembers, bind_mount_of, diff_exclusions
from pyshim.checkpoint_restore.restore import POD_IPS_KEY


def archive_members(containers, images, record, sandbox, status_of: Callable) -> ArchiveMembers:
    """`containers`: the ContainerManager; `images`: the image store; `sandbox`: the pod's record (or
    None); see the module docstring for `status_of`."""
    config = containers.config_of(record)
    spec = containers.spec_of(record)
    return ArchiveMembers(
        config=fmt.CheckpointConfig(
            id=record.id, name=config.metadata.name, **base_image_fields(images, record), runtime="runc",
            created_time_ns=record.created_at, checkpointed_time_ns=time.time_ns(),
            # "engine" tells pyshim's archives apart from containerd's, whose annotations they share;
            # the pod's addresses decide at restore whether established TCP connections can live on;
            # libpod's keys let Podman restore the archive too.
            extra={"engine": "pyshim",
                   POD_IPS_KEY: [ip for ip in ([sandbox.ip, *sandbox.additional_ips] if sandbox else []) if ip],
                   **portable.libpod_config_fields(spec, record.base_image_id or record.image_id)}),
        spec=portable.portable_spec(spec, [m.container_path for m in config.mounts], config.annotations),
        status=status_of(record, config),
        bind_mounts=[bind_mount_of(m.host_path, m.container_path) for m in config.mounts],
        log_path=record.log_path,
        diff_exclusions=diff_exclusions([m.container_path for m in config.mounts]),
    )


def base_image_fields(images, record) -> dict:
    """The image the container's rootfs is built on. rootfsImageRef is NAME@DIGEST where known
    (containerd's form, which it pulls): another node pulls exactly this image to restore on. Else
    it is the image ID as bare hex, the only form CRI-O accepts there. A restored container's base is
    the image under its checkpoint, not the checkpoint image itself."""
    if not record.base_image_id:
        image = images.get(record.image_id)
        ref = image.repo_digests[0] if image is not None and image.repo_digests else _bare(record.image_id)
        return {"rootfs_image": record.image_ref, "rootfs_image_ref": ref, "rootfs_image_name": record.image_name}
    image = images.get(record.base_image_id)
    if image is None:
        return {"rootfs_image_ref": _bare(record.base_image_id)}
    name = (image.repo_tags or image.repo_digests or [image.id])[0]
    ref = image.repo_digests[0] if image.repo_digests else _bare(image.id)
    return {"rootfs_image": name, "rootfs_image_ref": ref, "rootfs_image_name": name}


def _bare(image_id: str) -> str:
    return image_id.removeprefix("sha256:")
