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
import threading
from pathlib import Path

from pyroute2 import IPRoute

from pyshim.errors import AlreadyExists, Internal, InvalidArgument

NETNS_DIR = Path("/run/netns")

# umount2(2) flag: detach now, let the kernel drop the mount once nothing uses it,
# so removal never fails with EBUSY because some process still has the file open.
MNT_DETACH = 2
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)


def netns_path(name: str) -> Path:
    _check_name(name)
    return NETNS_DIR / name


def create_netns(name: str) -> Path:
    """Create and pin a fresh network namespace with its loopback up.

    Raises AlreadyExists when the pin is already there: names are sandbox ids, so a
    leftover pin means an earlier sandbox was not cleaned up and must not be reused.

    No fork: the daemon is a multithreaded gRPC server, and a forked child of it
    (which pyroute2's netns helpers use) crashes. Instead one short-lived thread
    unshares its own network namespace (unshare(2) of CLONE_NEWNET affects only the
    calling thread), pins it, and configures it from inside with a plain IPRoute.
    """
    path = netns_path(name)
    if path.exists() and not is_ns_pin(path):
        # An empty pin file is what a crash between create and bind mount leaves.
        path.unlink()
    if path.exists():
        raise AlreadyExists(f"network namespace {name!r} already exists at {path}")
    _ensure_shared_netns_dir()
    outcome: list[BaseException] = []
    worker = threading.Thread(target=_create_in_thread, args=(path, outcome), name=f"netns-{name}")
    worker.start()
    worker.join()
    if outcome:
        remove_netns(name)
        raise Internal(f"creating network namespace {name!r} at {path}: {outcome[0]}") from outcome[0]
    return path


def _create_in_thread(path: Path, outcome: list) -> None:
    """Runs in its own thread, which ends inside the new namespace (threads never go back to the pool)."""
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
        os.close(fd)
        source = f"/proc/self/task/{threading.get_native_id()}/ns/net"
        if _libc.mount(source.encode(), os.fsencode(str(path)), None, MS_BIND, None) != 0:
            raise OSError(ctypes.get_errno(), f"bind mount {source}: {os.strerror(ctypes.get_errno())}")
        # A netlink socket belongs to the namespace of the thread that opens it.
        with IPRoute() as ipr:
            (lo_index,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=lo_index, state="up")
    except BaseException as exc:  # noqa: BLE001 - reported to the calling thread
        outcome.append(exc)


def _ensure_shared_netns_dir() -> None:
    """Make /run/netns a shared mount of its own, as `ip netns add` does, so pins propagate to
    mount namespaces created later (runc's) and unmounts propagate too."""
    NETNS_DIR.mkdir(parents=True, exist_ok=True, mode=0o755)
    if not _is_mountpoint(NETNS_DIR):
        if _libc.mount(os.fsencode(str(NETNS_DIR)), os.fsencode(str(NETNS_DIR)), None, MS_BIND | MS_REC, None) != 0:
            raise Internal(f"bind mounting {NETNS_DIR}: {os.strerror(ctypes.get_errno())}")
    if _libc.mount(b"none", os.fsencode(str(NETNS_DIR)), None, MS_SHARED | MS_REC, None) != 0:
        raise Internal(f"making {NETNS_DIR} a shared mount: {os.strerror(ctypes.get_errno())}")


def _is_mountpoint(path: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(_unescape_mountinfo(line.split()[4]) == str(path) for line in f)


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


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid network namespace name {name!r}: want 1-255 of [A-Za-z0-9_.-], "
            "not starting with '.', '_' or '-'"
        )


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def connect_in_netns(path: Path | None, host: str, port: int, timeout: float = 10.0):
    """A TCP connection to host:port made inside the network namespace pinned at `path` (None: the
    host's). The socket is created by a short-lived thread that setns()es itself into the namespace
    and ends there: no thread of the daemon's pools ever changes namespace, no process is forked.
    Raises OSError (e.g. ECONNREFUSED) as connect does."""
    import socket

    if path is None:
        return socket.create_connection((host, port), timeout=timeout)
    outcome: list = []

    def connect():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome.append(socket.create_connection((host, port), timeout=timeout))
        except BaseException as exc:  # noqa: BLE001 - reported to the calling thread
            outcome.append(exc)

    worker = threading.Thread(target=connect, name="netns-connect")
    worker.start()
    worker.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    sock = outcome[0]
    sock.settimeout(None)
    return sock
