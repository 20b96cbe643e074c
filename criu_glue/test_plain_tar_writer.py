"""The kernel-copied plain tar is tarfile's own bytes, and refuses a member that shrank."""
from __future__ import annotations

import io
import os
import tarfile
import tempfile
from pathlib import Path

import pytest

import criu_glue.plain_tar_writer as plain
from criu_glue.errors import ArchiveError
from criu_glue.plain_tar_writer import PlainTarWriter
from criu_glue.tarstream import set_exact_mtime


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="criu-glue-test-") as d:
        yield Path(d)


def entries(base: Path) -> list[tuple[tarfile.TarInfo, Path | None]]:
    """Members that take each of tarfile's header paths: plain ustar, a pax name (long, non-ASCII,
    undecodable), a pax mtime, sizes on and off the 512-byte blocks, an empty file, a directory."""
    made = []
    d = tarfile.TarInfo("checkpoint")
    d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o700, 1_700_000_000
    made.append((d, None))
    names = {"pages-1.img": 3 * 512, "core-1.img": 1, "odd.img": 513, "empty.img": 0,
             "x" * 150 + ".img": 700, "caf\u00e9.img": 10, "raw-\udcff.img": 20}
    for i, (name, size) in enumerate(names.items()):
        source = base / f"src{i}"
        source.write_bytes(os.urandom(size))
        info = tarfile.TarInfo(f"checkpoint/{name}")
        info.size, info.mode, info.uid, info.gid = size, 0o600, 0, 0
        set_exact_mtime(info, 1_700_000_000_000_000_000 + i * 123_456_789)
        made.append((info, source))
    return made


def with_tarfile(made) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for info, source in made:
            if source is None:
                tar.addfile(info)
            else:
                with open(source, "rb") as data:
                    tar.addfile(info, data)
    return out.getvalue()


def test_it_writes_exactly_what_tarfile_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(plain, "COPY_STEP", 256)  # several kernel copies per member, and partial steps
    made = entries(tmp_path)
    out = tmp_path / "out.tar"
    reported = []
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        tar = PlainTarWriter(fd, progress=reported.append)
        for info, source in made:
            tar.add(info, source)
        tar.close()
    finally:
        os.close(fd)
    data = out.read_bytes()
    assert data == with_tarfile(made)
    assert tar.size == len(data) and len(data) % tarfile.RECORDSIZE == 0
    # Progress only grows, never beyond what is in the file, and ends at the whole archive.
    assert reported == sorted(reported) and reported[-1] == len(data) and len(reported) > len(made)


def test_a_member_that_shrank_is_refused(tmp_path):
    source = tmp_path / "pages.img"
    source.write_bytes(b"p" * 1000)
    info = tarfile.TarInfo("checkpoint/pages.img")
    info.size = 4096  # what lstat said before the file shrank
    fd = os.open(tmp_path / "out.tar", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(ArchiveError, match="pages.img: it ended at byte 1000 of 4096"):
            PlainTarWriter(fd).add(info, source)
    finally:
        os.close(fd)


def test_a_symlink_is_not_followed(tmp_path):
    (tmp_path / "secret").write_bytes(b"s" * 10)
    (tmp_path / "link.img").symlink_to(tmp_path / "secret")
    info = tarfile.TarInfo("checkpoint/link.img")
    info.size = 10
    fd = os.open(tmp_path / "out.tar", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(OSError):
            PlainTarWriter(fd).add(info, tmp_path / "link.img")
    finally:
        os.close(fd)
