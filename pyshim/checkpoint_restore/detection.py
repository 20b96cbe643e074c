"""Restore detection: is this CreateContainer a restore, and from what? (and the base image it needs)

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

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from criu_glue.checkpoint_image import is_checkpoint_image
from oci.errors import ImageError
from oci.reference import Reference
from pyshim.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:  # restore.py imports this module
    from pyshim.checkpoint_restore.restore import Restorer, RestorePlan

log = logging.getLogger(__name__)

_IMAGE_ID = re.compile(r"^(sha256:)?[a-f0-9]{64}$")


@dataclass(frozen=True)
class RestoreSource:
    """A CreateContainer that restores: the checked archive and the checkpoint image it came from, if any."""
    plan: RestorePlan
    checkpoint_image_id: str = ""  # "" when the request named an archive path


def restore_source(restorer: Restorer, images, config) -> RestoreSource | None:
    """The checkpoint this CreateContainer restores from, checked; None for an ordinary container.
    `images` is the image store (oci.store.ImageStore)."""
    image_name = config.image.image
    if os.path.isabs(image_name):
        restorer.check_enabled()
        return RestoreSource(restorer.plan(Path(image_name), config))
    image = images.get(image_name)
    if image is None or not is_checkpoint_image(image):
        return None
    restorer.check_enabled()
    if len(image.layers) != 1:
        raise InvalidArgument(f"checkpoint image {image_name} has {len(image.layers)} layers; "
                              "a checkpoint image holds the archive in exactly one")
    blob = images.blob_path(image.layers[0].digest)
    return RestoreSource(restorer.plan(blob, config), checkpoint_image_id=image.id)


def base_image(images, puller, refs: tuple[str, ...]):
    """The image the checkpointed container ran on: local if present, else pulled by the most exact
    reference the checkpoint gives (NAME@DIGEST before a tag). `puller` is the daemon's image puller
    (pyshim/internal/image_pulls.py)."""
    for ref in refs:
        image = images.get(ref)
        if image is not None:
            return image
    pullable = [r for r in refs if not _IMAGE_ID.match(r) and _parses(r)]
    pullable.sort(key=lambda r: "@" not in r)
    errors = []
    for ref in pullable:
        try:
            image = puller.pull(images, ref, None)
        except ImageError as e:
            errors.append(f"{ref}: {e}")
            continue
        log.info("base image of checkpoint pulled", extra={"image": ref, "id": image.id})
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
