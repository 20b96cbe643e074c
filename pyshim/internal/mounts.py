"""Overlay root filesystems and unmounting, through libc (no `mount` process on the hot path)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from pyshim.errors import Internal

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
