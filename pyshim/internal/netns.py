"""Named network namespaces for pod sandboxes.

A pod's network namespace must outlive every process in it (containers come and go,
the daemon restarts), so it is pinned by a bind mount of its nsfs inode at
/run/netns/<name>: the place `ip netns` and other runtimes use, so operators can
inspect a pod's network with the tools they know.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from pyshim.errors import AlreadyExists, Internal, InvalidArgument

NETNS_DIR = Path("/run/netns")

# umount2(2) flag: detach now, let the kernel drop the mount once nothing uses it,
# so removal never fails with EBUSY because some process still has the file open.
MNT_DETACH = 2

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def netns_path(name: str) -> Path:
    _check_name(name)
    return NETNS_DIR / name


def create_netns(name: str) -> Path:
    """Create and pin a fresh network namespace with its loopback up.

    Raises AlreadyExists when the pin is already there: names are sandbox ids, so a
    leftover pin means an earlier sandbox was not cleaned up and must not be reused.
    """
    path = netns_path(name)
    if path.exists() and not is_ns_pin(path):
        # An empty pin file is what a crash between create and bind mount leaves.
        path.unlink()
    try:
        # pyroute2 forks a child to unshare, so this thread keeps the host netns;
        # it also makes /run/netns a shared mount, as `ip netns add` does.
        pyroute2_netns.create(str(path))
    except FileExistsError as exc:
        raise AlreadyExists(f"network namespace {name!r} already exists at {path}") from exc
    except OSError as exc:
        remove_netns(name)
        raise Internal(f"creating network namespace {name!r} at {path}: {exc}") from exc
    try:
        _bring_loopback_up(path)
    except Exception as exc:
        remove_netns(name)
        raise Internal(f"bringing lo up in network namespace {name!r}: {exc}") from exc
    return path


def remove_netns(name: str) -> None:
    """Unpin a network namespace; a no-op when it is already gone."""
    unmount_ns_pin(netns_path(name))


def netns_exists(name: str) -> bool:
    return is_ns_pin(netns_path(name))


def is_ns_pin(path: Path) -> bool:
    """True when `path` has a namespace (nsfs) bind-mounted on it."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                # mountinfo: id parent major:minor root mountpoint ... - fstype source
                if (
                    _unescape_mountinfo(fields[4]) == str(path)
                    and fields[fields.index("-") + 1] == "nsfs"
                ):
                    return True
    except OSError:
        return False
    return False


def unmount_ns_pin(path: Path) -> None:
    """Unmount (lazily) and unlink a namespace pin file; silent when already gone.

    Also used for the IPC/UTS pins of pod_namespaces: same mechanics, one place.
    """
    # A pin can be stacked (mounted twice) after a crash-and-retry; unmount until the
    # kernel says nothing is mounted there any more.
    for _ in range(8):
        if _libc.umount2(os.fsencode(str(path)), MNT_DETACH) == 0:
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # not a mount point / no such file
            break
        raise Internal(f"unmounting namespace pin {path}: {os.strerror(err)}")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise Internal(f"removing namespace pin {path}: {exc}") from exc


def _bring_loopback_up(path: Path) -> None:
    with IPRoute(netns=str(path)) as ipr:
        (lo_index,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=lo_index, state="up")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid network namespace name {name!r}: want 1-255 of [A-Za-z0-9_.-], "
            "not starting with '.', '_' or '-'"
        )


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
