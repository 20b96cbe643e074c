import gzip
import hashlib
import io
import os
import socket
import stat
import struct
import subprocess
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from criu_glue.errors import (ArchiveError, ArchiveFormatError, ArchiveLimitExceeded,
                              UnsafeArchive)
from criu_glue.limits import Limits
from criu_glue.rootfs_diff import OVERLAY_OPAQUE_XATTR, apply_rootfs_diff, write_rootfs_diff

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="whiteouts, trusted.* xattrs, chown and mounts need root")
MTIME = 1_700_000_000


@pytest.fixture
def tmp_path():
    """Replaces pytest's tmp_path, which keeps the last runs' directories: tests leave nothing."""
    with tempfile.TemporaryDirectory(prefix="criu-glue-test-") as d:
        yield Path(d)


# ---------------------------------------------------------------- helpers

def entry(name, kind=tarfile.REGTYPE, data=b"", mode=0o644, linkname="", devmajor=0,
          devminor=0, uid=0, gid=0, pax=None):
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


def diff_file(tmp_path, entries, compress=None, name="rootfs-diff.tar") -> Path:
    data = tar_bytes(entries)
    if compress == "gzip":
        data = gzip.compress(data)
    elif compress == "zstd":
        import zstandard
        data = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / name
    path.write_bytes(data)
    return path


def snapshot(root: Path, skip=()) -> dict:
    """Everything a restore must reproduce, per path: type, owner, mode, mtime, content,
    link target, xattrs (overlay's own excluded), and which paths share an inode."""
    result, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = "/" + str(path.relative_to(root))
            if any(rel == s or rel.startswith(s + "/") for s in skip):
                continue
            st = os.lstat(path)
            info = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
                    "uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime_ns}
            if stat.S_ISREG(st.st_mode):
                info["sha"] = hashlib.sha256(path.read_bytes()).hexdigest()
                info["nlink"] = st.st_nlink
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = st.st_rdev
            info["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False)
                              for n in os.listxattr(path, follow_symlinks=False)
                              if not n.startswith("trusted.overlay.")}
            result[rel] = info
    result["hardlink groups"] = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
    return result


def without_dir_mtimes(snap: dict) -> dict:
    return {path: {k: v for k, v in info.items() if not (k == "mtime" and
                                                         info["type"] == stat.S_IFDIR)}
            if isinstance(info, dict) else info for path, info in snap.items()}


@contextmanager
def overlay(base: Path, lower: Path, name: str):
    upper, work, merged = base / f"{name}-upper", base / f"{name}-work", base / f"{name}-merged"
    for d in (upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        yield upper, merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def cap_net_raw() -> bytes:
    # struct vfs_cap_data, revision 2, effective: permitted = CAP_NET_RAW (13).
    return struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def build_lower(lower: Path) -> None:
    for d in ("etc", "data/sub", "opaque/oldsub", "del/deep", "usr/lib", "vol"):
        (lower / d).mkdir(parents=True)
    (lower / "etc/motd").write_text("welcome\n")
    (lower / "etc/keep").write_text("to be deleted\n")
    (lower / "data/a").write_text("aaa")
    (lower / "data/sub/b").write_text("bbb")
    (lower / "opaque/old1").write_text("old")
    (lower / "opaque/oldsub/x").write_text("old x")
    (lower / "opaque/oldsub/y").write_text("old y")
    (lower / "del/deep/f").write_text("f")
    (lower / "usr/lib/libc.so").write_text("elf")
    os.symlink("usr/lib", lower / "lib")
    (lower / "vol/seed").write_text("seed")


def change_container(merged: Path) -> None:
    """What a container does to its rootfs, through the overlay."""
    (merged / "etc/motd").write_text("changed\n")
    os.unlink(merged / "etc/keep")
    subprocess.run(["rm", "-rf", str(merged / "del")], check=True)
    os.chmod(merged / "data/a", 0o600)                   # metadata-only copy-up
    os.utime(merged / "data/sub/b", ns=(1, 1_234_567_891_234_567_891))
    new = merged / "new"
    new.mkdir(mode=0o750)
    (new / "file").write_bytes(os.urandom(70_000))
    os.chown(new / "file", 1000, 1001)
    os.chmod(new / "file", 0o640)
    os.setxattr(new / "file", "user.note", b"hello")
    os.link(new / "file", new / "hardlink")
    os.symlink("../etc/motd", new / "link")
    (new / "suid").write_text("#!/bin/sh\n")
    os.chmod(new / "suid", 0o4755)
    (new / "ping").write_bytes(b"\x7fELF")
    os.setxattr(new / "ping", "security.capability", cap_net_raw())
    os.mkfifo(new / "fifo", 0o600)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(new / "sock"))                         # not representable in tar: skipped
    sock.close()
    (merged / "usr/lib/libnew.so").write_text("new lib")  # through the lib -> usr/lib symlink
    # rm -rf + mkdir makes an opaque directory; part of the old tree is re-created.
    subprocess.run(["rm", "-rf", str(merged / "opaque")], check=True)
    (merged / "opaque/oldsub").mkdir(parents=True)
    (merged / "opaque/fresh").write_text("fresh")
    (merged / "opaque/oldsub/y").write_text("new y")
    (merged / "vol/state").write_text("volume content")  # excluded below, like a volume
    (merged / "etc/hostname").write_text("runtime-managed\n")


# ---------------------------------------------------------------- the real overlay round trip

@needs_root
@pytest.mark.parametrize("with_lowers", [True, False], ids=["lower-dirs", "upper-only"])
def test_overlay_changes_round_trip_onto_a_fresh_upper(tmp_path, with_lowers):
    lower = tmp_path / "lower"
    lower.mkdir()
    build_lower(lower)
    diff = tmp_path / "rootfs-diff.tar"
    with overlay(tmp_path, lower, "orig") as (upper, merged):
        change_container(merged)
        assert os.getxattr(upper / "opaque", OVERLAY_OPAQUE_XATTR) == b"y"  # precondition
        assert stat.S_ISCHR(os.lstat(upper / "etc/keep").st_mode)
        deleted = write_rootfs_diff(upper, diff, exclude=["/vol/"],
                                    lower_dirs=[lower] if with_lowers else ())
        expected = snapshot(merged, skip=("/vol", "/etc/hostname", "/new/sock"))

    assert stat.S_IMODE(os.stat(diff).st_mode) == 0o600
    if with_lowers:
        assert deleted == ["/del", "/etc/keep", "/opaque/old1", "/opaque/oldsub/x"]
    else:
        assert deleted == ["/del", "/etc/keep", "/opaque"]
    with tarfile.open(diff) as tar:
        names = tar.getnames()
    assert "new/file" in names and "usr/lib/libnew.so" in names
    assert not any(n.startswith(("vol", "etc/hostname", "new/sock")) or ".wh." in n
                   for n in names)
    assert "etc/keep" not in names

    with overlay(tmp_path, lower, "restored") as (_, merged):
        # The container made a FIFO: that needs allow_devices.
        apply_rootfs_diff(diff, deleted, merged, Limits(), allow_devices=True, keep_setid=True)
        restored = snapshot(merged, skip=("/vol", "/etc/hostname"))
    assert restored == expected
    assert expected["/new/suid"]["mode"] == 0o4755
    assert expected["/new/ping"]["xattrs"]["security.capability"] == cap_net_raw()
    assert expected["/data/sub/b"]["mtime"] == 1_234_567_891_234_567_891
    assert expected["hardlink groups"] == [["/new/file", "/new/hardlink"]]

    if with_lowers:
        # Exact deletions mean the same in CRI-O's and Podman's order: tar first, then delete.
        with overlay(tmp_path, lower, "podman-order") as (_, merged):
            apply_rootfs_diff(diff, [], merged, allow_devices=True, keep_setid=True)
            apply_rootfs_diff(None, deleted, merged)
            podman_order = snapshot(merged, skip=("/vol", "/etc/hostname"))
        # Deleting last bumps the parents' mtimes; everything else must be identical.
        assert without_dir_mtimes(podman_order) == without_dir_mtimes(expected)


# ---------------------------------------------------------------- writing from a hand-made upper

@needs_root
def test_whiteouts_become_deletions_and_excludes_cover_subtrees(tmp_path):
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    os.mknod(upper / "etc/gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (upper / "etc/xwhiteout").write_bytes(b"")
    os.setxattr(upper / "etc/xwhiteout", "trusted.overlay.whiteout", b"")
    (upper / "etc/real").write_text("x")
    os.setxattr(upper / "etc/real", "trusted.overlay.origin", b"\x00fh")
    (upper / "proc/1").mkdir(parents=True)
    (upper / "mnt/vol").mkdir(parents=True)
    (upper / "mnt/vol/data").write_text("volume")
    os.mknod(upper / "mnt/vol/wh", stat.S_IFCHR, os.makedev(0, 0))
    (upper / "mnt/volume2").write_text("not below /mnt/vol")
    out = tmp_path / "diff.tar"
    deleted = write_rootfs_diff(upper, out, exclude=["/mnt//vol"])
    assert deleted == ["/etc/gone", "/etc/xwhiteout"]
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == ["etc", "etc/real", "mnt", "mnt/volume2"]
        assert not any(k.startswith("SCHILY.xattr.trusted.overlay")
                       for k in tar.getmember("etc/real").pax_headers)


@needs_root
@pytest.mark.parametrize("xattr", ["trusted.overlay.redirect", "trusted.overlay.metacopy"])
def test_redirect_and_metacopy_uppers_are_refused_and_leave_no_tar(tmp_path, xattr):
    upper = tmp_path / "upper"
    (upper / "moved").mkdir(parents=True)
    os.setxattr(upper / "moved", xattr, b"/old")
    out = tmp_path / "diff.tar"
    with pytest.raises(ArchiveError, match=xattr.rsplit(".", 1)[1]):
        write_rootfs_diff(upper, out)
    assert not out.exists()


def test_exclude_with_dotdot_is_a_caller_error(tmp_path):
    with pytest.raises(ValueError):
        write_rootfs_diff(tmp_path, tmp_path / "d.tar", exclude=["/a/../etc"])


# ---------------------------------------------------------------- applying hostile diffs

@pytest.fixture
def rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "usr/lib").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0\n")
    os.symlink("usr/lib", root / "lib")
    os.symlink(str(tmp_path / "outside"), root / "escape")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/secret").write_text("host secret")
    return root


def assert_refused(tmp_path, rootfs, entries, match, deleted=(), **kw):
    before = snapshot(rootfs)
    outside_before = snapshot(tmp_path / "outside")
    with pytest.raises(UnsafeArchive, match=match) as err:
        apply_rootfs_diff(diff_file(tmp_path, entries), list(deleted), rootfs, **kw)
    # The check pass refuses before anything is written, inside or outside the root.
    assert snapshot(rootfs) == before
    assert snapshot(tmp_path / "outside") == outside_before
    return err.value


@pytest.mark.parametrize("entries,match", [
    ([entry("ok"), entry("../evil")], "'..'"),
    ([entry("ok"), entry("a/../../evil")], "'..'"),
    ([entry("ok"), entry("/etc/evil")], "absolute"),
    ([entry("ok"), entry("link", tarfile.SYMTYPE, linkname="/"), entry("link/etc/evil")],
     "parent 'link' is a symlink"),
    ([entry("escape/secret", data=b"overwritten")], "parent 'escape' is a symlink"),
    ([entry("lib/libevil.so")], "parent 'lib' is a symlink"),
    ([entry("etc/passwd/x")], "parent 'etc/passwd' is a file"),
    ([entry("dev-null", tarfile.CHRTYPE, devmajor=1, devminor=3)], "device node"),
    ([entry("disk", tarfile.BLKTYPE, devmajor=8, devminor=0)], "device node"),
    ([entry("pipe", tarfile.FIFOTYPE)], "FIFO"),
    ([entry("h", tarfile.LNKTYPE, linkname="../outside/secret")], "'..'"),
    ([entry("h", tarfile.LNKTYPE, linkname="/etc/passwd")], "absolute"),
    ([entry("h", tarfile.LNKTYPE, linkname="escape/secret")], "parent 'escape' is a symlink"),
    ([entry("h", tarfile.LNKTYPE, linkname="lib")], "a symlink, not a regular file"),
    ([entry("h", tarfile.LNKTYPE, linkname="usr")], "a dir, not a regular file"),
    ([entry("h", tarfile.LNKTYPE, linkname="missing")], "missing"),
    ([entry("h", tarfile.LNKTYPE, linkname="h")], "itself"),
    ([entry("s", tarfile.SYMTYPE, linkname="/etc"), entry("h", tarfile.LNKTYPE, linkname="s")],
     "a symlink, not a regular file"),
    ([entry("x/.wh.y/z")], "whiteout name used as a directory"),
    ([entry("etc/.wh...")], "whiteout of '..'"),
    ([entry("escape/.wh.secret")], "parent 'escape' is a symlink"),
    ([entry("odd", b"V")], "unsupported tar member type"),
])
def test_hostile_members_are_refused_before_anything_is_written(tmp_path, rootfs, entries,
                                                                 match):
    err = assert_refused(tmp_path, rootfs, entries, match)
    assert "rootfs-diff.tar" in str(err)


@pytest.mark.parametrize("deleted,match", [
    (["/escape/secret"], "parent 'escape' is a symlink"),
    (["/lib/x"], "parent 'lib' is a symlink"),
    (["/"], "whole root"),
    (["/../outside/secret"], "'..'"),
])
def test_hostile_deletions_are_refused(tmp_path, rootfs, deleted, match):
    assert_refused(tmp_path, rootfs, [entry("ok")], match, deleted=deleted)


def test_overlay_whiteout_devices_are_refused_even_when_devices_are_allowed(tmp_path, rootfs):
    assert_refused(tmp_path, rootfs, [entry("wh", tarfile.CHRTYPE)], "0:0",
                   allow_devices=True)


@needs_root
def test_devices_and_fifos_with_allow_devices(tmp_path, rootfs):
    apply_rootfs_diff(diff_file(tmp_path, [
        entry("null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        entry("pipe", tarfile.FIFOTYPE, mode=0o620)]), [], rootfs, allow_devices=True)
    st = os.lstat(rootfs / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert stat.S_ISFIFO(os.lstat(rootfs / "pipe").st_mode)


@pytest.mark.parametrize("limits,entries", [
    (Limits(max_total_bytes=10), [entry("a", data=b"12345"), entry("b", data=b"123456")]),
    (Limits(max_entries=2), [entry("a"), entry("b"), entry("c")]),
    (Limits(max_path_len=20), [entry("d" * 21)]),
    (Limits(max_path_len=20), [entry("s", tarfile.SYMTYPE, linkname="t" * 21)]),
])
def test_limits_are_enforced(tmp_path, rootfs, limits, entries):
    err = assert_refused(tmp_path, rootfs, entries, "exceeds|more than|longer than",
                         limits=limits)
    assert isinstance(err, ArchiveLimitExceeded)


def test_deleted_paths_count_against_the_entry_limit(tmp_path, rootfs):
    with pytest.raises(ArchiveLimitExceeded):
        apply_rootfs_diff(None, ["/a", "/b", "/c"], rootfs, Limits(max_entries=2))


def test_oversized_extended_header_is_a_format_error(tmp_path, rootfs):
    raw = tar_bytes([entry("a", pax={"comment": "x" * (2 << 20)})])
    (tmp_path / "d.tar").write_bytes(raw)
    with pytest.raises(ArchiveFormatError, match="extended header"):
        apply_rootfs_diff(tmp_path / "d.tar", [], rootfs)


@pytest.mark.parametrize("cut", [700, 1024 + 512 + 100, -1024])
def test_truncated_diff_is_a_format_error(tmp_path, rootfs, cut):
    raw = tar_bytes([entry("a", data=b"x" * 2000), entry("b", data=b"y")])
    (tmp_path / "d.tar").write_bytes(raw[:cut] if cut > 0 else raw[:len(raw) + cut - 9216])
    with pytest.raises(ArchiveFormatError, match="d.tar"):
        apply_rootfs_diff(tmp_path / "d.tar", [], rootfs)


# ---------------------------------------------------------------- applying good diffs

@needs_root
def test_plain_diff_keeps_owner_mode_setuid_xattrs_and_exact_mtime(tmp_path, rootfs):
    caps = cap_net_raw().decode("utf-8", "surrogateescape")
    apply_rootfs_diff(diff_file(tmp_path, [
        entry("usr/bin/", tarfile.DIRTYPE, mode=0o711, uid=2, gid=3),
        entry("usr/bin/tool", data=b"tool", mode=0o4755,
              pax={"mtime": "1700000000.123456789", "SCHILY.xattr.user.k": "v",
                   "SCHILY.xattr.security.capability": caps,
                   "SCHILY.xattr.trusted.overlay.opaque": "y"}),
        entry("home/u/notes", data=b"n", uid=1000, gid=1000, mode=0o600),
        entry("etc/passwd", data=b"root:x:0:0\nu:x:1000:1000\n"),
        entry("etc/hard", tarfile.LNKTYPE, linkname="etc/passwd"),
        entry("lib", tarfile.DIRTYPE, mode=0o755),   # replaces the lib -> usr/lib symlink
        entry("lib/x", data=b"now a real dir"),
    ]), ["/etc/passwd"], rootfs, keep_setid=True)
    tool = rootfs / "usr/bin/tool"
    st = os.lstat(tool)
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_mtime_ns == 1_700_000_000_123_456_789
    assert os.getxattr(tool, "user.k") == b"v"
    assert os.getxattr(tool, "security.capability") == cap_net_raw()
    assert "trusted.overlay.opaque" not in os.listxattr(tool)
    d = os.lstat(rootfs / "usr/bin")
    assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode), d.st_mtime) == (2, 3, 0o711, MTIME)
    assert (rootfs / "etc/passwd").read_text().endswith("u:x:1000:1000\n")
    assert os.lstat(rootfs / "etc/hard").st_ino == os.lstat(rootfs / "etc/passwd").st_ino
    assert os.lstat(rootfs / "home/u/notes").st_uid == 1000
    assert not (rootfs / "lib").is_symlink() and (rootfs / "lib/x").read_text()
    assert (rootfs / "usr/lib").is_dir()


@needs_root
def test_setid_bits_and_file_capabilities_are_stripped_unless_kept(tmp_path, rootfs):
    """A non-root restore must not gain set-uid-root binaries or file capabilities from the
    archive; directories keep set-gid (group inheritance) and sticky bits."""
    caps = cap_net_raw().decode("utf-8", "surrogateescape")
    (rootfs / "bin").mkdir(exist_ok=True)
    diff = diff_file(tmp_path, [
        entry("bin/su", data=b"evil", mode=0o4755),            # replaces an image file
        entry("bin/sg", data=b"evil", mode=0o2711, uid=0, gid=42),
        entry("bin/ping", data=b"evil", mode=0o755,
              pax={"SCHILY.xattr.security.capability": caps, "SCHILY.xattr.user.k": "v"}),
        entry("shared/", tarfile.DIRTYPE, mode=0o3775),
        entry("shared/f", data=b"x", mode=0o644),
    ])
    (rootfs / "bin/su").write_text("image su")
    apply_rootfs_diff(diff, [], rootfs)
    mode = lambda p: stat.S_IMODE(os.lstat(rootfs / p).st_mode)  # noqa: E731
    assert (mode("bin/su"), mode("bin/sg"), mode("bin/ping")) == (0o755, 0o711, 0o755)
    assert "security.capability" not in os.listxattr(rootfs / "bin/ping")
    assert os.getxattr(rootfs / "bin/ping", "user.k") == b"v"
    assert mode("shared") == 0o3775 and mode("shared/f") == 0o644
    assert (rootfs / "bin/su").read_text() == "evil"  # the content is the container's own

    apply_rootfs_diff(diff, [], rootfs, keep_setid=True)  # a root or privileged restore
    assert (mode("bin/su"), mode("bin/sg")) == (0o4755, 0o2711)
    assert os.getxattr(rootfs / "bin/ping", "security.capability") == cap_net_raw()


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_containerd_style_compressed_diff_with_oci_whiteouts(tmp_path, rootfs, compress):
    (rootfs / "data/old").mkdir(parents=True)
    (rootfs / "data/old/f").write_text("old")
    (rootfs / "data/keepme").write_text("old too")
    (rootfs / "etc/gone").write_text("bye")
    apply_rootfs_diff(diff_file(tmp_path, [
        entry("data/", tarfile.DIRTYPE, mode=0o755),
        entry("data/new", data=b"new"),
        entry("data/.wh..wh..opq"),        # after data/new: what the diff wrote stays
        entry("data/newer", data=b"newer"),
        entry("data/implicit/parent/f", data=b"parent dirs never listed"),
        entry("data/.wh..wh..opq"),        # a second marker must not undo the diff's own
        entry("etc/.wh.gone"),
        entry("etc/.wh.never-existed"),
        entry(".wh..wh.plnk"),            # aufs bookkeeping: ignored
    ], compress=compress), [], rootfs)
    assert sorted(os.listdir(rootfs / "data")) == ["implicit", "new", "newer"]
    assert (rootfs / "data/implicit/parent/f").read_bytes() == b"parent dirs never listed"
    assert not (rootfs / "etc/gone").exists()
    assert (rootfs / "etc/passwd").exists()


def test_deletions_run_before_the_tar_and_tolerate_missing_paths(tmp_path, rootfs):
    (rootfs / "srv/old").mkdir(parents=True)
    (rootfs / "srv/old/f").write_text("hidden by opaque dir")
    apply_rootfs_diff(diff_file(tmp_path, [entry("srv/old/", tarfile.DIRTYPE, mode=0o755),
                                           entry("srv/old/g", data=b"new")]),
                      ["/srv/old", "/not/there", "/etc/passwd/x", "/lib"], rootfs)
    assert os.listdir(rootfs / "srv/old") == ["g"]
    assert not (rootfs / "lib").exists() and (rootfs / "usr/lib").is_dir()


def test_root_entry_is_accepted_but_leaves_the_root_alone(tmp_path, rootfs):
    os.chmod(rootfs, 0o755)
    apply_rootfs_diff(diff_file(tmp_path, [entry("./", tarfile.DIRTYPE, mode=0o777),
                                           entry("./a", data=b"a")]), [], rootfs)
    assert stat.S_IMODE(os.stat(rootfs).st_mode) == 0o755
    assert (rootfs / "a").read_bytes() == b"a"
