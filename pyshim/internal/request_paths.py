"""Host paths that a CRI request names, confined to where they belong.

The daemon runs as root: a container log path of `../../etc/x`, an absolute one, or a pod log
directory taken relative to the daemon's working directory would let a request write (and
append to) any host file; a cgroup parent with `..` would put a pod anywhere in the hierarchy.
kubelet sends an absolute pod log_directory, a container log_path relative to it
("name/N.log"), and with the cgroupfs driver an absolute cgroup parent ("/kubepods/burstable/podUID").
"""
from __future__ import annotations

import posixpath

from pyshim.errors import InvalidArgument


def check_log_directory(log_directory: str) -> None:
    """A pod's log_directory: empty (no container logs), or an absolute, normalized path."""
    if not log_directory:
        return
    _check_plain(log_directory, "pod log_directory")
    if not posixpath.isabs(log_directory):
        raise InvalidArgument(f"pod log_directory {log_directory!r} must be an absolute path")
    if ".." in log_directory.split("/"):
        raise InvalidArgument(f"pod log_directory {log_directory!r} must not contain '..'")


def container_log_path(log_directory: str, log_path: str) -> str:
    """The absolute host path of a container's log: `log_path` (relative) inside the pod's
    `log_directory`; "" when the request names no log."""
    if not log_path:
        return ""
    _check_plain(log_path, "container log_path")
    if posixpath.isabs(log_path):
        raise InvalidArgument(f"container log_path {log_path!r} must be relative to the pod's log_directory")
    parts = log_path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidArgument(f"container log_path {log_path!r} must be a normalized relative path "
                              "(no '..', '.' or empty components), e.g. 'name/0.log'")
    if not log_directory:
        raise InvalidArgument(f"container log_path {log_path!r} is given but the pod has no log_directory")
    check_log_directory(log_directory)
    return posixpath.join(log_directory, log_path)


def check_cgroup_parent(cgroup_parent: str) -> None:
    """A pod's cgroup_parent (cgroupfs driver): empty (the daemon's default), or an absolute path
    whose components are neither empty, '.' nor '..'."""
    if not cgroup_parent:
        return
    _check_plain(cgroup_parent, "pod cgroup_parent")
    if not cgroup_parent.startswith("/"):
        raise InvalidArgument(f"pod cgroup_parent {cgroup_parent!r} must be an absolute cgroupfs path such as "
                              "'/kubepods/burstable/pod<uid>' (pyshim uses the cgroupfs driver)")
    parts = cgroup_parent.strip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidArgument(f"pod cgroup_parent {cgroup_parent!r} must not contain '..', '.' or empty components")


def _check_plain(path: str, what: str) -> None:
    if any(c in path for c in "\0\n"):
        raise InvalidArgument(f"{what} {path!r} contains a NUL or newline character")
