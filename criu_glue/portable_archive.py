"""What makes a pyshim checkpoint archive restorable by Podman 5, containerd 2 and CRI-O as well as
by pyshim: one archive, read by four different restore paths (see the README, "Archives other
engines restore", for which member and field each engine reads).

- config.dump is checkpointctl's ContainerConfig for containerd, CRI-O and pyshim, and at the same
  time the part of libpod's ContainerConfig that `podman container restore --import` needs
  (Podman unmarshals config.dump as its whole container configuration; Go's decoder matches keys
  case-insensitively and ignores unknown ones, and the two structs share only id, name, runtime,
  createdTime and rootfsImageName, with the same types): libpod_config_fields().
- spec.dump carries nothing that only made sense in the pod it was taken in: Podman runs it as the
  restored container's config.json, so namespace paths, the cgroup path and the bind sources of the
  old pod's hosts/hostname/resolv.conf would be used as they are: portable_spec().
- CRIU's record of the mode of the container's `/`: each engine gives a new container's `/` its own
  mode (containers/storage 0555 for an image without a root entry, containerd 0755, pyshim 0755)
  and none of them applies a root entry of a diff tar, while CRIU refuses to restore when the mode
  differs from the dumped one ("File . has bad mode"): forget_root_mode().
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import criu_images
from .archive_format import PODMAN_IMAGE_ID_KEY
from .criu_pb import fdinfo_pb2

# spec.dump annotation where CRI-O keeps the CRI request's annotations as a JSON object; its restore
# refuses an archive without it (json.Unmarshal of "") and gives the new container these annotations.
CRIO_ANNOTATIONS = "io.kubernetes.cri-o.Annotations"

# libpod ContainerConfig keys (libpod/container_config.go) written next to checkpointctl's.
LIBPOD_CREATE_NETNS = "createNetNS"
LIBPOD_USER = "user"
LIBPOD_STOP_TIMEOUT = "stopTimeout"
PODMAN_DEFAULT_STOP_TIMEOUT = 10  # seconds, containers.conf's stop_timeout default

_BIND_OPTIONS = ("bind", "rbind")


def portable_spec(spec: Mapping[str, Any], request_mount_destinations: Iterable[str],
                  cri_annotations: Mapping[str, str]) -> dict[str, Any]:
    """spec.dump for an archive: the container's OCI config without what belongs to the node and
    pod it ran in.

    - namespace paths go (the types stay): they name the old pod's pinned IPC/UTS namespaces, its
      network namespace and a process's PID namespace, which on another node do not exist and on
      this one may belong to another pod by the time of the restore;
    - linux.cgroupsPath goes: it names a cgroup under the old pod's parent;
    - bind mounts the runtime added itself (the pod's hosts, hostname and resolv.conf files) go,
      so that a restoring engine binds its own files there; the request's own mounts (volumes)
      stay, since pyshim and CRI-O require each of them in the new request;
    - CRI-O's copy of the CRI annotations is added.
    pyshim's own restore takes namespaces, cgroup and those files from the new pod and reads only
    the process arguments and the bind destinations from spec.dump; containerd reads only the
    annotations.
    """
    out = copy.deepcopy(dict(spec))
    linux = out.get("linux")
    if isinstance(linux, dict):
        for ns in linux.get("namespaces") or []:
            if isinstance(ns, dict):
                ns.pop("path", None)
        linux.pop("cgroupsPath", None)
    keep = set(request_mount_destinations)
    out["mounts"] = [m for m in out.get("mounts") or []
                     if not (_is_bind(m) and m.get("destination") not in keep)]
    annotations = dict(out.get("annotations") or {})
    annotations[CRIO_ANNOTATIONS] = json.dumps(dict(cri_annotations), sort_keys=True)
    out["annotations"] = annotations
    return out


def _is_bind(mount: Mapping[str, Any]) -> bool:
    return mount.get("type") == "bind" or any(o in _BIND_OPTIONS for o in mount.get("options") or [])


def libpod_config_fields(spec: Mapping[str, Any], image_id: str) -> dict[str, Any]:
    """The libpod ContainerConfig keys `podman container restore --import` needs beyond
    checkpointctl's, for config.dump (CheckpointConfig.extra).

    - rootfsImageID, the base image's ID as bare hex: libpod refuses a config with a
      rootfsImageName but no rootfsImageID ("both RootfsImageName and RootfsImageID must be set"),
      and creates the container's storage from that image after pulling rootfsImageName;
    - createNetNS when the container had a network namespace: Podman then makes a new one and hands
      it to CRIU as the external namespace the dump recorded (the pod's); without it the container
      would get no namespace CRIU can use and no /etc/resolv.conf for CRIU to bind;
    - user, when the process is not root: libpod refuses a spec user without it;
    - stopTimeout: Podman's default, instead of 0 (SIGKILL at once on `podman stop`).
    """
    fields: dict[str, Any] = {}
    bare = image_id.removeprefix("sha256:")
    if bare:
        fields[PODMAN_IMAGE_ID_KEY] = bare
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    if any(isinstance(ns, dict) and ns.get("type") == "network" for ns in namespaces):
        fields[LIBPOD_CREATE_NETNS] = True
    user = (spec.get("process") or {}).get("user") or {}
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    if uid or gid:
        fields[LIBPOD_USER] = f"{uid}:{gid}"
    fields[LIBPOD_STOP_TIMEOUT] = PODMAN_DEFAULT_STOP_TIMEOUT
    return fields


def forget_root_mode(images_dir: Path) -> int:
    """Drop the mode CRIU recorded for the container's `/` (in files.img), so that no restore
    refuses a `/` whose mode the restoring engine chose differently; returns how many entries
    changed. Every other file keeps its recorded mode. pyshim's own restore then leaves `/` as
    its new container has it (0755)."""
    path = Path(images_dir) / "files.img"
    if not path.exists():
        return 0
    image = criu_images.read_image(path, criu_images.FILES)
    changed = 0
    for entry in image.entries:
        if entry.type == fdinfo_pb2.REG and entry.HasField("reg") and entry.reg.name == "/" \
                and entry.reg.HasField("mode"):
            entry.reg.ClearField("mode")
            changed += 1
    if changed:
        criu_images.write_image(path, image)
    return changed
