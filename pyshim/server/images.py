"""ImageService: ListImages, ImageStatus, PullImage, RemoveImage, ImageFsInfo."""
from __future__ import annotations

import json
import time

from cri_api import api_pb2 as cri
from criu_glue.checkpoint_image import is_checkpoint_image
from criu_glue.checkpoint_pull import unpack_while_pulling
from criu_glue.errors import ArchiveError
from oci.registry import Credentials
from pyshim.errors import FailedPrecondition, InvalidArgument
from pyshim.server.runtime import Runtime


def _image(record) -> "cri.Image":
    image = cri.Image(id=record.id, repo_tags=list(record.repo_tags), repo_digests=list(record.repo_digests),
                      size=record.size, spec=cri.ImageSpec(image=record.id, annotations=dict(record.annotations)))
    user = record.config.user.split(":", 1)[0]
    if user.isdigit():
        image.uid.value = int(user)
    else:
        image.username = user
    return image


def list_images(rt: Runtime, request) -> "cri.ListImagesResponse":
    wanted = request.filter.image.image if request.HasField("filter") else ""
    if wanted:
        record = rt.images.get(wanted)
        return cri.ListImagesResponse(images=[_image(record)] if record else [])
    return cri.ListImagesResponse(images=[_image(r) for r in rt.images.list()])


def image_status(rt: Runtime, request) -> "cri.ImageStatusResponse":
    """An image that is not present is not an error: the response simply has no image (kubelet pulls then)."""
    record = rt.images.get(request.image.image)
    if record is None:
        return cri.ImageStatusResponse()
    info = {}
    if request.verbose:
        info["info"] = json.dumps({"manifestDigest": record.manifest_digest,
                                   "layers": [layer.digest for layer in record.layers],
                                   "config": {"entrypoint": record.config.entrypoint, "cmd": record.config.cmd,
                                              "env": record.config.env, "workingDir": record.config.working_dir}})
    return cri.ImageStatusResponse(image=_image(record), info=info)


def _credentials(auth) -> Credentials | None:
    if not any((auth.username, auth.password, auth.auth, auth.identity_token, auth.registry_token)):
        return None
    return Credentials(username=auth.username, password=auth.password, auth=auth.auth,
                       identity_token=auth.identity_token, registry_token=auth.registry_token)


def pull_image(rt: Runtime, request) -> "cri.PullImageResponse":
    name = request.image.image
    if not name:
        raise InvalidArgument("PullImage: image name is empty")
    started = time.monotonic()
    record = rt.registry.pull(rt.images, name, _credentials(request.auth), blob_tap=_checkpoint_unpacking(rt))
    rt.log.info("image pulled", extra={"image": name, "id": record.id,
                                       "seconds": round(time.monotonic() - started, 3)})
    _unpack_checkpoint(rt, record)
    return cri.PullImageResponse(image_ref=record.id)


def _checkpoint_unpacking(rt: Runtime):
    """A checkpoint image's layer is unpacked while it downloads (criu_glue.checkpoint_pull)."""
    if rt.restorer.cache is None:
        return None
    return unpack_while_pulling(rt.images, rt.restorer.limits_for(rt.images.root))


def _unpack_checkpoint(rt: Runtime, record) -> None:
    """A checkpoint image's CRIU images go into the store at pull, so that its restores only link
    them. Not fatal: the restore unpacks (and reports a broken checkpoint) itself."""
    if rt.restorer.cache is None or not is_checkpoint_image(record) or len(record.layers) != 1:
        return
    started = time.monotonic()
    try:
        cached = rt.restorer.cache.unpack_image(record, rt.restorer.limits_for(rt.images.root))
    except (ArchiveError, OSError) as e:
        rt.log.warning("checkpoint image pulled but its CRIU images could not be unpacked; a restore "
                       "will try again", extra={"id": record.id, "error": getattr(e, "message", str(e))})
        return
    rt.log.info("checkpoint image unpacked", extra={"id": record.id, "image_bytes": cached.image_bytes,
                                                     "unpacked": cached.unpacked,
                                                     "seconds": round(time.monotonic() - started, 3)})


def remove_image(rt: Runtime, request) -> "cri.RemoveImageResponse":
    """Remove an image. An absent image is no error (CRI); one used by a container is refused."""
    record = rt.images.get(request.image.image)
    if record is None:
        return cri.RemoveImageResponse()
    users = rt.containers.image_in_use(record.id)
    if users:
        raise FailedPrecondition(f"image {request.image.image} is in use by container(s) {', '.join(u[:13] for u in users)}; "
                                 "remove them first")
    rt.images.remove(record.id)
    return cri.RemoveImageResponse()


def image_fs_info(rt: Runtime, request) -> "cri.ImageFsInfoResponse":
    used, inodes = rt.images.usage()
    usage = cri.FilesystemUsage(timestamp=time.time_ns(),
                                fs_id=cri.FilesystemIdentifier(mountpoint=str(rt.images.mountpoint)),
                                used_bytes=cri.UInt64Value(value=used), inodes_used=cri.UInt64Value(value=inodes))
    return cri.ImageFsInfoResponse(image_filesystems=[usage])
