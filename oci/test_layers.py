import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

try:
    import zstandard
except ImportError:  # optional dependency: zstd layers are then refused, not unpacked
    zstandard = None

from oci.errors import ImageError, UnsafeLayer
from oci.layers import OVERLAY_OPAQUE_XATTR, safe_path_in, unpack_layer

TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MTIME = 1_600_000_000


@pytest.fixture
def tmp_path():
    """Replaces pytest's tmp_path, which keeps the last runs' directories: tests leave nothing."""
    with tempfile.TemporaryDirectory(prefix="pyshim-oci-test-") as d:
        yield Path(d)


def entry(name, kind=tarfile.REGTYPE, data=b"", mode=0o644, uid=0, gid=0, linkname="",
          devmajor=0, devminor=0, pax=None):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, MTIME
    info.linkname, info.devmajor, info.devminor = linkname, devmajor, devminor
    if kind == tarfile.REGTYPE:
        info.size = len(data)
    if pax:
        info.pax_headers = pax
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def tar_bytes(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, data)
    return buf.getvalue()


def write_blob(tmp_path: Path, data: bytes, name="layer.tar") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def unpack(tmp_path, entries, dest_name="out"):
    blob = write_blob(tmp_path, tar_bytes(entries))
    dest = tmp_path / dest_name
    return dest, unpack_layer(blob, TAR, dest)


def test_files_dirs_and_metadata_are_kept(tmp_path):
    dest, _ = unpack(tmp_path, [
        entry("./", tarfile.DIRTYPE, mode=0o755),
        entry("usr/", tarfile.DIRTYPE, mode=0o755),
        entry("usr/bin/", tarfile.DIRTYPE, mode=0o711, uid=2, gid=3),
        entry("usr/bin/tool", data=b"#!/bin/sh\n", mode=0o4755, uid=0, gid=0),
        entry("usr/data", data=b"x" * 70000, mode=0o640, uid=1000, gid=1001,
              pax={"SCHILY.xattr.user.note": "hello"}),
        entry("tmp", tarfile.DIRTYPE, mode=0o1777),
    ])
    tool = os.lstat(dest / "usr/bin/tool")
    assert (dest / "usr/bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(tool.st_mode) == 0o4755  # setuid survives the chown
    data = os.lstat(dest / "usr/data")
    assert (data.st_uid, data.st_gid, stat.S_IMODE(data.st_mode)) == (1000, 1001, 0o640)
    assert data.st_size == 70000 and data.st_mtime == MTIME
    assert os.getxattr(dest / "usr/data", "user.note") == b"hello"
    bindir = os.lstat(dest / "usr/bin")
    assert (bindir.st_uid, bindir.st_gid, stat.S_IMODE(bindir.st_mode)) == (2, 3, 0o711)
    assert stat.S_IMODE(os.lstat(dest / "tmp").st_mode) == 0o1777


def test_directory_mtimes_survive_later_children(tmp_path):
    dest, _ = unpack(tmp_path, [
        entry("etc/", tarfile.DIRTYPE, mode=0o755),
        entry("etc/a", data=b"a"),
        entry("etc/.wh.gone"),
    ])
    assert os.lstat(dest / "etc").st_mtime == MTIME


def test_symlinks_hardlinks_devices_and_fifos(tmp_path):
    dest, _ = unpack(tmp_path, [
        entry("bin/", tarfile.DIRTYPE, mode=0o755),
        entry("bin/busybox", data=b"ELF", mode=0o755),
        entry("bin/sh", tarfile.SYMTYPE, linkname="/bin/busybox"),
        entry("bin/rel", tarfile.SYMTYPE, linkname="../etc/nowhere"),
        entry("bin/ash", tarfile.LNKTYPE, linkname="bin/busybox"),
        entry("dev/", tarfile.DIRTYPE, mode=0o755),
        entry("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        entry("dev/loop0", tarfile.BLKTYPE, mode=0o660, devmajor=7, devminor=0),
        entry("run/fifo", tarfile.FIFOTYPE, mode=0o620),
    ])
    assert os.readlink(dest / "bin/sh") == "/bin/busybox"
    assert os.readlink(dest / "bin/rel") == "../etc/nowhere"
    assert os.lstat(dest / "bin/ash").st_ino == os.lstat(dest / "bin/busybox").st_ino
    null = os.lstat(dest / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK(os.lstat(dest / "dev/loop0").st_mode)
    fifo = os.lstat(dest / "run/fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o620
    # "run/" had no entry of its own: created as a plain 0755 directory.
    assert stat.S_IMODE(os.lstat(dest / "run").st_mode) == 0o755


def test_whiteouts_become_overlay_whiteouts(tmp_path):
    dest, _ = unpack(tmp_path, [
        entry("etc/", tarfile.DIRTYPE, mode=0o755),
        entry("etc/.wh.motd"),
        entry("opt/app/", tarfile.DIRTYPE, mode=0o755),
        entry("opt/app/.wh..wh..opq"),
        entry("opt/app/fresh", data=b"new"),
        entry("var/.wh..wh.plnk"),  # aufs bookkeeping: ignored
    ])
    wh = os.lstat(dest / "etc/motd")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == os.makedev(0, 0)
    assert not (dest / "etc/.wh.motd").exists()
    assert os.getxattr(dest / "opt/app", OVERLAY_OPAQUE_XATTR) == b"y"
    assert not os.path.lexists(dest / "opt/app/.wh..wh..opq")
    assert (dest / "opt/app/fresh").read_bytes() == b"new"
    assert os.listdir(dest / "var") == []


def test_layer_cannot_smuggle_overlay_xattrs(tmp_path):
    dest, _ = unpack(tmp_path, [
        entry("d/", tarfile.DIRTYPE, mode=0o755,
              pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
    ])
    with pytest.raises(OSError):
        os.getxattr(dest / "d", OVERLAY_OPAQUE_XATTR)


def test_later_entries_replace_earlier_ones_without_following_links(tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("untouched")
    dest, _ = unpack(tmp_path, [
        entry("x", tarfile.SYMTYPE, linkname=str(outside)),
        entry("x", data=b"replaced"),
        entry("y", data=b"file first"),
        entry("y/", tarfile.DIRTYPE, mode=0o755),
    ])
    assert outside.read_text() == "untouched"
    assert not os.path.islink(dest / "x") and (dest / "x").read_bytes() == b"replaced"
    assert (dest / "y").is_dir()


@pytest.mark.parametrize("entries", [
    [entry("/etc/passwd", data=b"root")],
    [entry("../escape", data=b"x")],
    [entry("a/../../escape", data=b"x")],
    [entry("link", tarfile.SYMTYPE, linkname="/"), entry("link/escape", data=b"x")],
    [entry("link", tarfile.SYMTYPE, linkname="../.."), entry("link/escape", data=b"x")],
    [entry("d/", tarfile.DIRTYPE), entry("d/l", tarfile.SYMTYPE, linkname="/tmp"),
     entry("d/l/.wh.x")],
    [entry("hl", tarfile.LNKTYPE, linkname="../outside")],
    [entry("hl", tarfile.LNKTYPE, linkname="/etc/passwd")],
    [entry("l", tarfile.SYMTYPE, linkname="/etc"), entry("hl", tarfile.LNKTYPE, linkname="l/passwd")],
    [entry("dir/.wh..")],
])
def test_escape_attempts_are_refused(tmp_path, entries):
    (tmp_path / "outside").write_text("secret")
    with pytest.raises(UnsafeLayer):
        unpack(tmp_path, entries)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.tar", "out", "outside"]
    assert not os.path.lexists("/escape") and not os.path.lexists(tmp_path / "escape")
    assert (tmp_path / "outside").read_text() == "secret"


def test_safe_path_in_is_usable_on_its_own(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "sym").symlink_to(tmp_path / "real")
    assert safe_path_in(tmp_path, "real/file") == tmp_path / "real/file"
    assert safe_path_in(tmp_path, "./real//file") == tmp_path / "real/file"
    assert safe_path_in(tmp_path, "sym") == tmp_path / "sym"  # the last component is not followed
    with pytest.raises(UnsafeLayer, match="symlink"):
        safe_path_in(tmp_path, "sym/file")
    with pytest.raises(UnsafeLayer, match="does not exist"):
        safe_path_in(tmp_path, "missing/file")
    assert safe_path_in(tmp_path, "new/deep/file", create_parents=True) == tmp_path / "new/deep/file"
    assert (tmp_path / "new/deep").is_dir()


def test_compressed_layers_report_the_uncompressed_diff_id(tmp_path):
    raw = tar_bytes([entry("hello", data=b"world")])
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    variants = {
        TAR: raw,
        TAR_GZ: gzip.compress(raw),
        # mislabelled compression is detected by magic bytes
        "application/vnd.docker.image.rootfs.diff.tar.gzip": raw,
    }
    if zstandard is not None:
        variants[TAR_ZSTD] = zstandard.ZstdCompressor().compress(raw)
    for i, (media_type, blob) in enumerate(variants.items()):
        dest = tmp_path / f"out{i}"
        assert unpack_layer(write_blob(tmp_path, blob, f"b{i}"), media_type, dest) == diff_id
        assert (dest / "hello").read_bytes() == b"world"


def test_unknown_media_type_and_garbage_are_errors(tmp_path):
    blob = write_blob(tmp_path, tar_bytes([entry("a", data=b"a")]))
    with pytest.raises(ImageError, match="unsupported layer media type"):
        unpack_layer(blob, "application/vnd.example.thing", tmp_path / "o1")
    bad = write_blob(tmp_path, gzip.compress(b"definitely not a tar" * 100)[:-20], "bad")
    with pytest.raises(ImageError, match="not a readable"):
        unpack_layer(bad, TAR_GZ, tmp_path / "o2")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting overlayfs needs root")
def test_unpacked_layers_stack_as_overlay_lowerdirs(tmp_path):
    lower, _ = unpack(tmp_path, [
        entry("a/", tarfile.DIRTYPE, mode=0o755),
        entry("a/file1", data=b"1"),
        entry("a/dir/", tarfile.DIRTYPE, mode=0o755),
        entry("a/dir/old", data=b"old"),
        entry("b/keep", data=b"keep"),
    ], "lower")
    upper, _ = unpack(tmp_path, [
        entry("a/.wh.file1"),
        entry("a/dir/", tarfile.DIRTYPE, mode=0o755),
        entry("a/dir/.wh..wh..opq"),
        entry("a/dir/new", data=b"new"),
    ], "upper")
    merged = tmp_path / "merged"
    merged.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={upper}:{lower}",
                    str(merged)], check=True)
    try:
        assert not (merged / "a/file1").exists()
        assert sorted(os.listdir(merged / "a/dir")) == ["new"]
        assert (merged / "b/keep").read_bytes() == b"keep"
    finally:
        subprocess.run(["umount", str(merged)], check=True)
