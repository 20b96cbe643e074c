"""Removing a directory tree of any depth: container, sandbox and checkpoint directories.

A container's writable layer is written by whatever ran in it, and a checkpoint's rootfs diff
by whoever made the archive: either can plant a tree thousands of levels deep. shutil.rmtree
recurses (RecursionError past ~1000 levels in Python 3.11) and path-based removal fails once
the path exceeds PATH_MAX, which left such a container's directory on disk for good.

remove_tree walks the tree with directory file descriptors only (openat/unlinkat), holding
two descriptors at a time whatever the depth: it goes down into one subdirectory after
another, and back up through "..", checking that ".." is the directory it came from. It
never follows a symlink and never crosses into another filesystem (a mount still in place,
e.g. a rootfs that failed to unmount, is an error, not something to empty).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class _Level:
    name: str  # in its parent
    dev: int
    ino: int


def remove_tree(path: str | os.PathLike, ignore_errors: bool = False) -> None:
    """Remove `path`, whatever it is (a missing path is fine). OSError on failure unless
    `ignore_errors`, in which case as much as possible is removed."""
    try:
        _remove(Path(path))
    except OSError:
        if not ignore_errors:
            raise


def _remove(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    parent_fd = os.open(path.parent, _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        _remove_dir_at(parent_fd, path.name, st.st_dev)
    finally:
        os.close(parent_fd)


def _remove_dir_at(parent_fd: int, name: str, device: int) -> None:
    """Empty and remove directory `name` of `parent_fd`, iteratively."""
    fd = _open_subdir(parent_fd, name, device)
    st = os.fstat(fd)
    path = [_Level(name, st.st_dev, st.st_ino)]  # the directories from the top down to fd
    try:
        while True:
            child = _empty_files_find_subdir(fd)
            if child is not None:
                child_fd = _open_subdir(fd, child, device)
                os.close(fd)
                fd = child_fd
                st = os.fstat(fd)
                path.append(_Level(child, st.st_dev, st.st_ino))
                continue
            done = path.pop()
            if not path:
                os.close(fd)
                fd = -1
                os.rmdir(done.name, dir_fd=parent_fd)
                return
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            st = os.fstat(up)
            if (st.st_dev, st.st_ino) != (path[-1].dev, path[-1].ino):
                os.close(up)
                raise OSError(f"directory {done.name!r} was moved while being removed")
            os.close(fd)
            fd = up
            os.rmdir(done.name, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


def _open_subdir(parent_fd: int, name: str, device: int) -> int:
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    if os.fstat(fd).st_dev != device:
        os.close(fd)
        raise OSError(f"{name!r} is a mount point (another filesystem): not removing inside it")
    return fd


def _empty_files_find_subdir(fd: int) -> str | None:
    """Unlink every non-directory entry of `fd`; the name of a subdirectory, if any is left."""
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            try:
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                pass
    return None
