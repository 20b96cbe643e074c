"""Which pod sysctls may be set, following Kubernetes' namespacing rules.

runc writes a container's sysctls inside its namespaces; only sysctls that the kernel
namespaces are safe to write there, otherwise one pod would change the whole host.
And a namespaced sysctl is still refused when the pod shares that namespace with the
host (host network / host IPC), for the same reason.
"""
from __future__ import annotations

import re

from pyshim.errors import InvalidArgument

# Kubernetes' sysctl name grammar: segments of [a-z0-9] with inner '-'/'_', joined by
# '.' or '/', at most 253 characters.
_SEGMENT = r"[a-z0-9]([-_a-z0-9]*[a-z0-9])?"
_NAME_RE = re.compile(rf"^({_SEGMENT}[./])*{_SEGMENT}$")
_MAX_NAME_LEN = 253

IPC = "ipc"
NET = "net"

_IPC_EXACT = ("kernel.sem",)
_IPC_PREFIXES = ("kernel.shm", "kernel.msg", "fs.mqueue.")
_NET_PREFIXES = ("net.",)


def validate_sysctls(sysctls: dict[str, str], host_network: bool, host_ipc: bool) -> dict[str, str]:
    """Check every sysctl and return them with names in dot-separated form.

    Raises InvalidArgument naming the first offending sysctl.
    """
    normalized: dict[str, str] = {}
    for raw_name, value in sysctls.items():
        name = normalize_sysctl_name(raw_name)
        _check_value(raw_name, value)
        namespace = sysctl_namespace(name)
        if namespace is None:
            raise InvalidArgument(
                f"sysctl {raw_name!r} is not namespaced: only kernel.shm*, kernel.msg*, "
                "kernel.sem, fs.mqueue.* (IPC) and net.* (network) may be set for a pod"
            )
        if namespace == NET and host_network:
            raise InvalidArgument(
                f"sysctl {raw_name!r} is network-namespaced and the pod uses the host network"
            )
        if namespace == IPC and host_ipc:
            raise InvalidArgument(
                f"sysctl {raw_name!r} is IPC-namespaced and the pod uses the host IPC namespace"
            )
        normalized[name] = value
    return normalized


def normalize_sysctl_name(name: str) -> str:
    """Return the dot-separated form of a sysctl name given with dots or slashes.

    As in kubelet, the first separator tells the notation; in slash notation a dot is
    part of a segment (net/ipv4/conf/eth0.100/rp_filter names VLAN eth0.100), so dots
    and slashes swap places.
    """
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME_LEN:
        raise InvalidArgument(f"invalid sysctl name {name!r}: must be 1-{_MAX_NAME_LEN} characters")
    if not _NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid sysctl name {name!r}: want lowercase [a-z0-9_-] segments "
            "separated by '.' or '/'"
        )
    first_separator = re.search(r"[./]", name)
    if first_separator and first_separator.group() == "/":
        return name.translate(str.maketrans("./", "/."))
    return name


def sysctl_namespace(dotted_name: str) -> str | None:
    """IPC or NET for a namespaced sysctl, None for one that is host-wide."""
    if dotted_name in _IPC_EXACT or dotted_name.startswith(_IPC_PREFIXES):
        return IPC
    if dotted_name.startswith(_NET_PREFIXES):
        return NET
    return None


def _check_value(name: str, value: str) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"sysctl {name!r}: value must be a string, got {type(value).__name__}")
    # /proc/sys takes one write; a newline would smuggle a second value in.
    if "\n" in value or "\r" in value or "\x00" in value:
        raise InvalidArgument(f"sysctl {name!r}: value {value!r} contains a newline or NUL")
