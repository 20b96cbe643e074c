"""remove_tree: any depth, any path length, no symlink followed."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from oci.tree_removal import remove_tree


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="tree-removal-test-") as d:
        yield Path(d)


def _plant_deep_tree(top: Path, depth: int, name: str) -> None:
    """A chain of `depth` directories, each with a file, made fd-relative as an archive's diff
    or a process in the container can: the full path is far longer than PATH_MAX."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=child))
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def test_a_tree_deeper_than_recursion_and_path_max_goes(tmp_path):
    top = tmp_path / "upper"
    _plant_deep_tree(top, 3000, "d" * 200)  # 600 kB of path, 3000 levels
    remove_tree(top)
    assert not top.exists() and os.listdir(tmp_path) == []


def test_files_symlinks_and_locked_directories(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("host file")
    top = tmp_path / "ctr"
    (top / "a/b").mkdir(parents=True)
    (top / "a/b/file").write_text("x")
    (top / "a/link-to-outside").symlink_to(outside)
    (top / "a/b/dangling").symlink_to("/nonexistent")
    os.mkfifo(top / "fifo")
    (top / "a/b").chmod(0)
    remove_tree(top)
    assert not top.exists()
    assert (outside / "keep").read_text() == "host file"


def test_missing_path_and_plain_file(tmp_path):
    remove_tree(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    remove_tree(tmp_path / "file")
    assert not (tmp_path / "file").exists()


def test_symlink_given_as_the_tree_is_removed_not_followed(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    (tmp_path / "link").symlink_to(target)
    remove_tree(tmp_path / "link")
    assert not (tmp_path / "link").is_symlink() and (target / "keep").exists()


def test_errors_are_raised_or_ignored_on_request(tmp_path, monkeypatch):
    top = tmp_path / "t"
    (top / "sub").mkdir(parents=True)

    def refuse(*args, **kwargs):
        raise PermissionError("refused")
    monkeypatch.setattr(os, "rmdir", refuse)
    with pytest.raises(PermissionError):
        remove_tree(top)
    remove_tree(top, ignore_errors=True)
