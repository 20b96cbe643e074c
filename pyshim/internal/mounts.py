"""Overlay root filesystems and unmounting, through libc (no `mount` process on the hot path)."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
from pathlib import Path

from pyshim.errors import Internal

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)

MNT_DETACH = 2
_EINVAL = 22


def mount_overlay(lowerdirs_bottom_to_top: list[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount an overlay at `target`: image layers read-only below, the container's writable layer on top."""
    if not lowerdirs_bottom_to_top:
        raise Internal("an overlay needs at least one lower layer")
    # overlayfs lists the topmost lower layer first.
    lower = ":".join(str(p) for p in reversed(lowerdirs_bottom_to_top))
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if len(options) >= 4096:
        raise Internal(f"image has too many layers for one overlay mount ({len(lowerdirs_bottom_to_top)})")
    if _libc.mount(b"overlay", str(target).encode(), b"overlay", 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise Internal(f"mounting overlay rootfs at {target} failed: {os.strerror(err)}")


def unmount(target: Path) -> None:
    """Unmount `target` if something is mounted there; a lazy detach so a busy mount still goes."""
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err in (_EINVAL, 2):  # not a mount point, or gone: nothing to do
            return
        raise Internal(f"unmounting {target} failed: {os.strerror(err)}")


def is_mountpoint(path: Path) -> bool:
    return os.path.ismount(path)


def _unescape_mount_field(text: str) -> str:
    """/proc/self/mountinfo writes space, tab, newline, backslash (and in options "," and "=") as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _split_lowerdir(value: str) -> list[str]:
    """overlayfs separates lower layers with ':'; a ':' inside a path is written as '\\:'."""
    parts, current, i = [], [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            current.append(value[i + 1])
            i += 2
            continue
        if value[i] == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(value[i])
        i += 1
    parts.append("".join(current))
    return [p for p in parts if p]


def overlay_lower_dirs(rootfs: Path, mountinfo: str = "/proc/self/mountinfo") -> list[Path]:
    """The image layer directories under the overlay mounted at `rootfs`, top layer first (the
    order write_rootfs_diff wants, and the order overlayfs lists them in `lowerdir=`).

    The container record does not keep its layers; the mount does. Returns [] (and the diff then
    describes an opaque directory by its own path in deleted.files) when `rootfs` is not an
    overlay mount, which only a damaged host produces.
    """
    target = str(rootfs)
    found: list[Path] | None = None
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError as e:
        log.warning("cannot read mountinfo", extra={"rootfs": target, "error": str(e)})
        return []
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields, super_fields = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(super_fields) < 3:
            continue
        if _unescape_mount_field(fields[4]) != target:
            continue
        if super_fields[0] != "overlay":
            found = []
            continue
        lowers: list[str] = []
        for option in super_fields[2].split(","):  # a ',' inside a value is escaped as \\054
            key, _, value = option.partition("=")
            if key == "lowerdir":
                lowers.extend(_split_lowerdir(_unescape_mount_field(value)))
            elif key == "lowerdir+":  # the new mount API lists one layer per option, top first
                lowers.append(_unescape_mount_field(value))
        found = [Path(p) for p in lowers]  # the last mount at a path is the one processes see
    if not found:
        log.warning("no overlay lower layers found at the rootfs", extra={"rootfs": target})
        return []
    return found
