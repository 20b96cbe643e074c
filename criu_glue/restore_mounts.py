"""The mount table CRIU will rebuild at restore, held against the new request's.

At restore CRIU mounts what its mountpoints-*.img images list, with the flags recorded there:
runc hands it the new bind-mount sources, but read-only flags, nosuid/nodev/noexec, the masks
over /proc/kcore and friends and the read-only /proc/sys all come from the archive. An archive
whose images drop them would give the restored container a writable /proc/sys or an unmasked
/proc/keys that a fresh container from the same request never has. weaker_mounts() lists every
such difference; the restorer refuses the checkpoint when there is any.

What is compared, for each mount namespace image (the request's spec is the fresh container's):
- every spec mount the images also mount: "ro" must be read-only there, and nosuid, nodev and
  noexec must be set; /proc must be procfs and /sys sysfs; under a cgroup mount every cgroup
  filesystem must be read-only when the spec's is;
- a read-only root filesystem stays read-only;
- every readonlyPaths entry that exists must be read-only as seen at that path;
- every maskedPaths entry that exists must have a mask on it: /dev/null bound over it, or a
  read-only tmpfs;
- procfs and sysfs appear nowhere but under the spec's /proc and /sys, each showing its own
  path there (no second /proc elsewhere with nothing masked, no /proc/sys showing all of /proc).
"Exists" is as runc decides when it creates a container (it skips missing paths): /proc and
/sys paths on this host's kernel, the rest in the new container's root filesystem.
Mounts the images lack altogether are not weaker (nothing is visible there) and are not listed.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

# <linux/mount.h> MS_* bits as CRIU records them in "flags" (per mount) and "sb_flags".
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
# CRIU's fstype enum (images/mnt.proto).
FSTYPE_PROC, FSTYPE_SYSFS, FSTYPE_TMPFS, FSTYPE_CGROUP, FSTYPE_CGROUP2 = 1, 2, 5, 12, 23
_KERNEL_FS = {"proc": FSTYPE_PROC, "sysfs": FSTYPE_SYSFS}
DEV_NULL = "/dev/null"


@dataclass(frozen=True)
class ImageMount:
    """One entry of a mountpoints-*.img."""
    image: str
    mnt_id: int
    parent_mnt_id: int
    mountpoint: str  # in the container, absolute
    fstype: int
    root: str        # the part of the filesystem mounted there
    flags: int
    sb_flags: int = 0
    ext_key: str = ""  # set for external (bind) mounts: the key runc maps to a host path

    @property
    def read_only(self) -> bool:
        return bool((self.flags | self.sb_flags) & MS_RDONLY)

    @property
    def is_mask(self) -> bool:
        """What runc puts over a masked path: /dev/null bound on it, or a read-only tmpfs."""
        return self.ext_key == DEV_NULL or (self.fstype == FSTYPE_TMPFS and self.read_only) or \
            (self.fstype == FSTYPE_TMPFS and self.root == "/null")

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> ImageMount:
        return cls(image=str(entry.get("image", "")), mnt_id=_int(entry["mnt_id"]),
                   parent_mnt_id=_int(entry["parent_mnt_id"]),
                   mountpoint=_clean(str(entry["mountpoint"])), fstype=_int(entry["fstype"]),
                   root=str(entry["root"]), flags=_int(entry["flags"]),
                   sb_flags=_int(entry.get("sb_flags", 0)), ext_key=str(entry.get("ext_key") or ""))


def weaker_mounts(mounts: Iterable[ImageMount], spec: dict[str, Any],
                  exists: Callable[[str], bool]) -> list[str]:
    """What the images would mount more weakly than `spec` (the new container's config.json)
    asks for, one sentence each; empty when nothing is weaker."""
    by_image: dict[str, list[ImageMount]] = {}
    for mount in mounts:
        by_image.setdefault(mount.image, []).append(mount)
    problems: list[str] = []
    for image in sorted(by_image):
        problems += _NamespaceCheck(by_image[image], spec, exists).problems()
    return list(dict.fromkeys(problems))


def exists_in_new_container(rootfs: Path) -> Callable[[str], bool]:
    """runc's notion of whether a masked or read-only path exists in the new container."""
    def exists(path: str) -> bool:
        if path in ("/proc", "/sys") or path.startswith(("/proc/", "/sys/")):
            return os.path.lexists(path)
        return os.path.lexists(Path(rootfs) / path.lstrip("/"))
    return exists


class _NamespaceCheck:
    def __init__(self, mounts: list[ImageMount], spec: dict[str, Any],
                 exists: Callable[[str], bool]):
        self.exists = exists
        self.spec_mounts = [m for m in spec.get("mounts") or [] if isinstance(m, dict)]
        linux = spec.get("linux") or {}
        self.masked = [_clean(p) for p in linux.get("maskedPaths") or []]
        self.readonly = [_clean(p) for p in linux.get("readonlyPaths") or []]
        self.root_readonly = bool((spec.get("root") or {}).get("readonly"))
        self.mounts = mounts
        self.top = self._topmost(mounts)  # mountpoint -> the mount visible there

    @staticmethod
    def _topmost(mounts: list[ImageMount]) -> dict[str, ImageMount]:
        """Several mounts may stack on one mount point: the visible one is mounted on the
        others, so it is the parent of none of them."""
        stacks: dict[str, list[ImageMount]] = {}
        for mount in mounts:
            stacks.setdefault(mount.mountpoint, []).append(mount)
        top = {}
        for point, stack in stacks.items():
            parents = {m.parent_mnt_id for m in stack}
            uncovered = [m for m in stack if m.mnt_id not in parents] or stack
            top[point] = max(uncovered, key=lambda m: m.mnt_id)
        return top

    def visible_at(self, path: str) -> ImageMount | None:
        while True:
            if path in self.top:
                return self.top[path]
            if path == "/":
                return None
            path = posixpath.dirname(path)

    def problems(self) -> list[str]:
        found: list[str] = []
        root = self.top.get("/")
        if self.root_readonly and root is not None and not root.read_only:
            found.append("the root filesystem is writable (the request makes it read-only)")
        for mount in self.spec_mounts:
            found += self._spec_mount(mount)
        for path in self.readonly:
            seen = self.visible_at(path)
            if self.exists(path) and seen is not None and not seen.read_only:
                found.append(f"{path} is writable (the request makes it read-only)")
        for path in self.masked:
            seen = self.top.get(path)
            if self.exists(path) and (seen is None or not seen.is_mask):
                found.append(f"{path} is not masked (the request masks it)")
        found += self._kernel_fs_elsewhere()
        return found

    def _spec_mount(self, spec_mount: dict[str, Any]) -> list[str]:
        destination = spec_mount.get("destination")
        if not isinstance(destination, str):
            return []
        destination = _clean(destination)
        options = [o for o in spec_mount.get("options") or [] if isinstance(o, str)]
        kind = spec_mount.get("type")
        if kind == "cgroup":
            # cgroup v1: runc mounts a tmpfs there and each hierarchy below it.
            return [f"{m.mountpoint} is a writable cgroup filesystem (the request makes "
                    f"{destination} read-only)" for m in self.mounts
                    if "ro" in options and m.fstype in (FSTYPE_CGROUP, FSTYPE_CGROUP2)
                    and _under(m.mountpoint, destination) and not m.read_only]
        image = self.top.get(destination)
        if image is None:
            return []
        found = []
        if kind in _KERNEL_FS and image.fstype != _KERNEL_FS[kind]:
            found.append(f"{destination} is not a {kind} mount (the request mounts {kind} there)")
        if "ro" in options and not image.read_only:
            found.append(f"{destination} is writable (the request mounts it read-only)")
        missing = [o for o, bit in _OPTION_FLAGS.items() if o in options and not image.flags & bit]
        if missing:
            found.append(f"{destination} lacks {', '.join(missing)} (the request sets "
                         f"{'them' if len(missing) > 1 else 'it'})")
        return found

    def _kernel_fs_elsewhere(self) -> list[str]:
        homes = {_clean(m["destination"]): _KERNEL_FS[m.get("type")] for m in self.spec_mounts
                 if m.get("type") in _KERNEL_FS and isinstance(m.get("destination"), str)}
        found = []
        for mount in self.mounts:
            if mount.fstype not in (FSTYPE_PROC, FSTYPE_SYSFS) or mount.ext_key:
                continue
            # Below its own mount point, showing that very path (runc's read-only /proc/sys
            # is procfs's /sys at /proc/sys), it shows nothing /proc or /sys does not.
            home = next((h for h, fs in homes.items() if fs == mount.fstype
                         and _under(mount.mountpoint, h)), None)
            name = "procfs" if mount.fstype == FSTYPE_PROC else "sysfs"
            if home is None:
                found.append(f"{name} is mounted at {mount.mountpoint}, where the request mounts "
                             "none")
            elif mount.root != ("/" if mount.mountpoint == home else
                                "/" + posixpath.relpath(mount.mountpoint, home)):
                found.append(f"{mount.mountpoint} shows {name}'s {mount.root}, not its own path")
        return found


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _clean(path: str) -> str:
    return posixpath.normpath("/" + path.lstrip("/")) if path else "/"


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value, 0)  # crit --pretty writes flags as "0x200001"
    raise ValueError(f"{value!r} is not a number")
