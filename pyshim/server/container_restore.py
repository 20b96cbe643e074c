"""Restore through CreateContainer/StartContainer: is this request a restore, and from what?

Kubernetes restores by naming a *checkpoint image* as the container's image; crictl users may
name a checkpoint archive on the node instead. Only the runtime can tell: an absolute path is an
archive; a local image whose annotations carry a checkpoint name (CRI-O's, checkpointctl's or
Podman's key) is a checkpoint image, whose single layer is the archive. Everything else is an
ordinary container.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from criu_glue.checkpoint_image import is_checkpoint_image
from oci.errors import ImageError
from oci.reference import Reference
from pyshim.errors import FailedPrecondition, InvalidArgument
from pyshim.internal.container_manager import RestoreSource
from pyshim.server.runtime import Runtime

_IMAGE_ID = re.compile(r"^(sha256:)?[a-f0-9]{64}$")


def restore_source(rt: Runtime, config) -> RestoreSource | None:
    """The checkpoint this CreateContainer restores from, checked; None for an ordinary container."""
    image_name = config.image.image
    if os.path.isabs(image_name):
        rt.restorer.check_enabled()
        return RestoreSource(rt.restorer.plan(Path(image_name), config))
    image = rt.images.get(image_name)
    if image is None or not is_checkpoint_image(image):
        return None
    rt.restorer.check_enabled()
    if len(image.layers) != 1:
        raise InvalidArgument(f"checkpoint image {image_name} has {len(image.layers)} layers; "
                              "a checkpoint image holds the archive in exactly one")
    blob = rt.images.blob_path(image.layers[0].digest)
    return RestoreSource(rt.restorer.plan(blob, config), checkpoint_image_id=image.id)


def base_image(rt: Runtime, refs: tuple[str, ...]):
    """The image the checkpointed container ran on: local if present, else pulled by the most exact
    reference the checkpoint gives (NAME@DIGEST before a tag)."""
    for ref in refs:
        image = rt.images.get(ref)
        if image is not None:
            return image
    pullable = [r for r in refs if not _IMAGE_ID.match(r) and _parses(r)]
    pullable.sort(key=lambda r: "@" not in r)
    errors = []
    for ref in pullable:
        try:
            image = rt.registry.pull(rt.images, ref, None)
        except ImageError as e:
            errors.append(f"{ref}: {e}")
            continue
        rt.log.info("base image of checkpoint pulled", extra={"image": ref, "id": image.id})
        return image
    tried = "; ".join(errors) or "no pullable reference"
    raise FailedPrecondition(f"base image of the checkpoint ({', '.join(refs)}) is not on this node and could "
                             f"not be pulled ({tried}); pull it first")


def _parses(ref: str) -> bool:
    try:
        Reference.parse(ref)
    except ImageError:
        return False
    return True
