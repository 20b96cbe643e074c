import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard

import criu_glue.archive as archive_mod
from criu_glue.archive import open_archive, write_archive
from criu_glue.archive_format import (CONTAINER_LOG, CRIO_LOG, PODMAN_LOG, BindMount,
                                      CheckpointConfig, write_bind_mounts, write_config,
                                      write_deleted_files, write_member, write_spec,
                                      write_status)
from criu_glue.errors import (ArchiveError, ArchiveFormatError, ArchiveLimitExceeded,
                              UnsafeArchive)
from criu_glue.limits import Limits
from criu_glue.rootfs_diff import apply_rootfs_diff

SPEC = {"ociVersion": "1.0.2", "process": {"args": ["sleep", "inf"]},
        "annotations": {"io.kubernetes.cri.container-name": "app"}}
IMAGES = {"inventory.img": b"\x01" * 40, "pstree.img": b"\x02" * 30,
          "pages-1.img": os.urandom(300_000), "core-1.img": b"\x03" * 700}
MTIME = 1_700_000_000


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="criu-glue-test-") as d:
        yield Path(d)


def prepare_members(base: Path) -> Path:
    """What the checkpoint driver leaves behind: CRIU images plus the metadata members."""
    members = base / "members"
    (members / "checkpoint").mkdir(parents=True)
    for name, data in IMAGES.items():
        (members / "checkpoint" / name).write_bytes(data)
    write_config(members, CheckpointConfig(id="c0ffee", name="app", runtime="runc",
                                           rootfs_image="docker.io/library/busybox:1.36",
                                           rootfs_image_ref="sha256:abc",
                                           created_time_ns=1_700_000_000_000_000_001,
                                           checkpointed_time_ns=1_700_000_100_5))
    write_spec(members, SPEC)
    from cri_api import api_pb2 as cri
    write_status(members, cri.ContainerStatus(id="c0ffee", metadata=cri.ContainerMetadata(name="app")))
    write_deleted_files(members, ["/etc/motd"])
    write_bind_mounts(members, [BindMount("/src", "/etc/hosts", "file", 0o644)])
    write_member(members, "dump.log", b"criu says hi\n")
    write_member(members, CONTAINER_LOG, b"2024-01-01T00:00:00Z stdout F hello\n")
    diff = io.BytesIO()
    with tarfile.open(fileobj=diff, mode="w") as tar:
        info = tarfile.TarInfo("etc/new")
        info.size, info.mtime = 3, MTIME
        tar.addfile(info, io.BytesIO(b"new"))
    write_member(members, "rootfs-diff.tar", diff.getvalue())
    return members


# ---------------------------------------------------------------- writing and reading back

@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_round_trip_with_each_compression(tmp_path, compression):
    members = prepare_members(tmp_path)
    out = tmp_path / "checkpoint.tar"
    write_archive(out, members, compression)
    magic = out.read_bytes()[:4]
    assert {"none": not magic.startswith((b"\x1f\x8b", b"\x28\xb5")),
            "gzip": magic.startswith(b"\x1f\x8b"),
            "zstd": magic == b"\x28\xb5\x2f\xfd"}[compression]

    with open_archive(out) as cp:
        assert cp.compression == compression
        assert cp.config().id == "c0ffee"
        assert cp.config().checkpointed_time_ns == 1_700_000_100_5
        assert cp.spec() == SPEC
        assert cp.status() == {"id": "c0ffee", "metadata": {"name": "app"}}
        assert cp.deleted_files() == ["/etc/motd"]
        assert cp.bind_mounts() == [BindMount("/src", "/etc/hosts", "file", 0o644)]
        assert cp.member_names()[0] == "checkpoint"
        assert set(cp.member_names()) == {"checkpoint", *(f"checkpoint/{n}" for n in IMAGES),
                                          "config.dump", "spec.dump", "status.dump",
                                          "deleted.files", "bind.mounts", "dump.log",
                                          CONTAINER_LOG, "rootfs-diff.tar"}
        assert cp.member_size("checkpoint/pages-1.img") == 300_000
        assert cp.checkpoint_size() == sum(len(d) for d in IMAGES.values())
        assert cp.rootfs_diff_size() == len((members / "rootfs-diff.tar").read_bytes())
        assert cp.log_member() == CONTAINER_LOG

        images = tmp_path / "images"
        assert cp.extract_checkpoint_images(images) == cp.checkpoint_size()
        assert stat.S_IMODE(os.stat(images).st_mode) == 0o700
        for name, data in IMAGES.items():
            assert (images / name).read_bytes() == data
            assert stat.S_IMODE(os.stat(images / name).st_mode) == 0o600

        diff = tmp_path / "diff.tar"
        cp.extract_member("rootfs-diff.tar", diff)
        assert diff.read_bytes() == (members / "rootfs-diff.tar").read_bytes()
        rootfs = tmp_path / "rootfs"
        (rootfs / "etc").mkdir(parents=True)
        (rootfs / "etc/motd").write_text("old")
        apply_rootfs_diff(diff, cp.deleted_files(), rootfs)
        assert sorted(os.listdir(rootfs / "etc")) == ["new"]
        with cp.open_member("dump.log") as f:
            assert f.read() == b"criu says hi\n"


def test_checkpoint_dir_is_a_real_first_entry_for_checkpointctl(tmp_path):
    out = tmp_path / "cp.tar"
    write_archive(out, prepare_members(tmp_path))
    with tarfile.open(out) as tar:
        first = tar.getmembers()[0]
    assert first.name == "checkpoint" and first.isdir()


def test_archive_is_private_from_creation_and_renamed_only_when_complete(tmp_path, monkeypatch):
    members = prepare_members(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "cp.tar"
    seen = {}
    real_mkstemp, real_rename = archive_mod.tempfile.mkstemp, archive_mod.os.rename

    def spy_mkstemp(*a, **kw):
        fd, name = real_mkstemp(*a, **kw)
        seen["created_mode"] = stat.S_IMODE(os.fstat(fd).st_mode)
        return fd, name

    def spy_rename(src, dst):
        seen["temp_name"] = Path(src).name
        seen["size_before_rename"] = os.stat(src).st_size
        seen["dest_existed"] = os.path.exists(dst)
        return real_rename(src, dst)

    monkeypatch.setattr(archive_mod.tempfile, "mkstemp", spy_mkstemp)
    monkeypatch.setattr(archive_mod.os, "rename", spy_rename)
    old_umask = os.umask(0)
    try:
        write_archive(out, members, "gzip")
    finally:
        os.umask(old_umask)
    assert seen["created_mode"] == 0o600
    assert seen["temp_name"].startswith(".cp.tar.") and seen["temp_name"].endswith(".tmp")
    assert seen["size_before_rename"] == os.stat(out).st_size and not seen["dest_existed"]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert os.listdir(out_dir) == ["cp.tar"]


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_archive(tmp_path):
    members = prepare_members(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "cp.tar").write_bytes(b"previous archive")
    os.mkfifo(members / "checkpoint" / "zz-fifo")   # found only while packing
    with pytest.raises(ArchiveError, match="zz-fifo"):
        write_archive(out_dir / "cp.tar", members, "zstd")
    assert os.listdir(out_dir) == ["cp.tar"]
    assert (out_dir / "cp.tar").read_bytes() == b"previous archive"


@pytest.mark.parametrize("remove,named", [("spec.dump", "spec.dump"),
                                          ("config.dump", "config.dump"),
                                          ("checkpoint", "checkpoint/")])
def test_writer_refuses_incomplete_member_dirs(tmp_path, remove, named):
    members = prepare_members(tmp_path)
    target = members / remove
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(ArchiveError, match=named):
        write_archive(tmp_path / "cp.tar", members)
    assert not (tmp_path / "cp.tar").exists()


# ---------------------------------------------------------------- other engines' layouts

def tar_of(entries, compression="none") -> bytes:
    """entries: (name, bytes) for files, (name, None) for directories, (name, TarInfo)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in entries:
            if isinstance(data, tarfile.TarInfo):
                tar.addfile(data)
                continue
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = MTIME, 0o600
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if compression == "gzip":
        return gzip.compress(raw)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def checkpoint_entries():
    return [("checkpoint/", None), *((f"checkpoint/{n}", d) for n, d in IMAGES.items())]


def podman_config() -> bytes:
    # Podman's config.dump is its whole container config: the keys CRI-O shares plus many more.
    return json.dumps({"spec": SPEC, "id": "5e1f", "name": "web", "rootfsImageID": "9d2a",
                       "rootfsImageName": "quay.io/app:1", "rootfs": "", "runtime": "crun",
                       "createdTime": "2024-03-01T10:00:00.123456789+01:00",
                       "networkDescriptions": {"podman": 0}}).encode()


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_reads_a_podman_export_layout(tmp_path, compression):
    """Built by hand in the order Podman's exportCheckpoint includes members (no sample archive
    is available offline): TarWithOptions of the bundle dir, compressed as --compress says."""
    entries = [("artifacts/", None), ("devshm-checkpoint.tar", tar_of([("x", b"shm")])),
               ("config.dump", podman_config()),
               ("spec.dump", json.dumps(dict(SPEC, annotations={
                   "io.container.manager": "libpod"})).encode()),
               ("network.status", b'{"podman": {"interfaces": {}}}'),
               ("stats-dump", b"\x08\x01"), ("ctr.log", b"log\n"), *checkpoint_entries(),
               ("rootfs-diff.tar", tar_of([("etc/app.conf", b"x=1\n")])),
               ("deleted.files", b'[\n  "/var/cache/apt"\n]'),
               ("volumes/", None), ("volumes/data.tar", tar_of([("f", b"vol")]))]
    path = tmp_path / "podman.tar.zst"
    path.write_bytes(tar_of(entries, compression))
    with open_archive(path) as cp:
        cfg = cp.config()
        assert (cfg.id, cfg.name, cfg.runtime, cfg.rootfs_image_name) == \
               ("5e1f", "web", "crun", "quay.io/app:1")
        assert cfg.created_time_ns == 1709283600_123456789
        assert cfg.extra["rootfsImageID"] == "9d2a" and cfg.extra["spec"] == SPEC
        assert cfg.checkpointed_time_ns is None
        assert cp.status() is None and cp.bind_mounts() == []
        assert cp.deleted_files() == ["/var/cache/apt"]
        assert cp.log_member() == PODMAN_LOG
        assert cp.metadata_member("network.status") == b'{"podman": {"interfaces": {}}}'
        assert cp.has_member("volumes/data.tar") and cp.has_member("devshm-checkpoint.tar")
        assert cp.extract_checkpoint_images(tmp_path / "img") == sum(map(len, IMAGES.values()))


def test_reads_crio_and_containerd_layouts(tmp_path):
    crio = [("stats-dump", b"\x08"), ("dump.log", b"log"), *checkpoint_entries(),
            ("config.dump", b'{"id": "a", "name": "b", "checkpointedTime": '
                            b'"2024-01-28T00:10:45.673538606+05:30", "restored": false}'),
            ("spec.dump", json.dumps(SPEC).encode()),
            ("bind.mounts", b'[{"source": "/s", "destination": "/d", "file_type": '
                            b'"directory", "permissions": 493}]'),
            ("rootfs-diff.tar", tar_of([])), ("io.kubernetes.cri-o.LogPath", b"log")]
    (tmp_path / "crio.tar").write_bytes(tar_of(crio))
    with open_archive(tmp_path / "crio.tar") as cp:
        assert cp.log_member() == CRIO_LOG
        assert cp.bind_mounts() == [BindMount("/s", "/d", "directory", 0o755)]
        assert cp.config().checkpointed_time_ns == 1706380845_673538606

    containerd = [*checkpoint_entries(), ("config.dump", b'{"id": "a", "name": "b"}'),
                  ("container.log", b"l"), ("dump.log", b""), ("spec.dump", b"{}"),
                  ("stats-dump", b""), ("status", b'{"Pid": 1}'),
                  ("status.dump", b'{"id": "a", "state": "CONTAINER_RUNNING"}'),
                  ("rootfs-diff.tar", tar_of([("etc/.wh.motd", b"")], "gzip"))]
    (tmp_path / "ctrd.tar").write_bytes(tar_of(containerd))
    with open_archive(tmp_path / "ctrd.tar") as cp:
        assert cp.status() == {"id": "a", "state": "CONTAINER_RUNNING"}
        assert cp.log_member() == CONTAINER_LOG
        cp.extract_member("rootfs-diff.tar", tmp_path / "diff.tar.gz")
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/motd").write_text("hi")
    apply_rootfs_diff(tmp_path / "diff.tar.gz", [], rootfs)
    assert not (rootfs / "etc/motd").exists()


def test_dot_slash_prefixed_names_are_accepted(tmp_path):
    entries = [("./", None), ("./checkpoint/", None),
               *((f"./checkpoint/{n}", d) for n, d in IMAGES.items()),
               ("./config.dump", b'{"id": "a", "name": "b"}'), ("./spec.dump", b"{}")]
    (tmp_path / "cp.tar").write_bytes(tar_of(entries))
    with open_archive(tmp_path / "cp.tar") as cp:
        assert cp.config().id == "a" and cp.has_member("checkpoint/pages-1.img")


# ---------------------------------------------------------------- damaged and hostile archives

def base_entries(without=()):
    entries = [*checkpoint_entries(), ("config.dump", b'{"id": "a", "name": "b"}'),
               ("spec.dump", b'{"ociVersion": "1.0.2"}')]
    return [(n, d) for n, d in entries if not any(n.startswith(w) for w in without)]


@pytest.mark.parametrize("without,named", [(["spec.dump"], "spec.dump"),
                                           (["config.dump"], "config.dump"),
                                           (["checkpoint"], "checkpoint/"),
                                           (["checkpoint/inventory.img"], "inventory.img"),
                                           (["spec.dump", "config.dump"],
                                            "config.dump, spec.dump")])
def test_missing_members_are_format_errors_naming_them(tmp_path, without, named):
    (tmp_path / "cp.tar").write_bytes(tar_of(base_entries(without)))
    with pytest.raises(ArchiveFormatError, match=named) as err:
        open_archive(tmp_path / "cp.tar")
    assert "missing" in str(err.value) and str(tmp_path / "cp.tar") in str(err.value)


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_truncated_or_corrupt_archives_are_format_errors(tmp_path, compression):
    raw = tar_of(base_entries(), compression)
    # Cut inside the data, after the last member (plain: the end-of-archive blocks; compressed:
    # the trailer with the checksum), in the middle of a header, and nothing at all.
    for damaged in (raw[:len(raw) // 2], raw.rstrip(b"\0") if compression == "none" else raw[:-5],
                    raw[:100] + bytes(b ^ 0xFF for b in raw[100:200]) + raw[200:], b""):
        (tmp_path / "cp.tar").write_bytes(damaged)
        with pytest.raises(ArchiveFormatError):
            open_archive(tmp_path / "cp.tar").close()


def test_bad_metadata_is_reported_at_open(tmp_path):
    entries = [(n, b'{"id": "a"}' if n == "config.dump" else d) for n, d in base_entries()]
    (tmp_path / "cp.tar").write_bytes(tar_of(entries))
    with pytest.raises(ArchiveFormatError, match="config.dump: key 'name' is missing"):
        open_archive(tmp_path / "cp.tar")


def special(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("extra,error,match", [
    ([("../evil", b"x")], UnsafeArchive, "'..'"),
    ([("/etc/evil", b"x")], UnsafeArchive, "absolute"),
    ([("config.dump", b'{"id": "z", "name": "z"}')], UnsafeArchive, "more than once"),
    ([("checkpoint", b"file now")], UnsafeArchive, "more than once"),
    ([("x" * 5000, b"")], ArchiveLimitExceeded, "longer than 4096"),
])
def test_hostile_names_and_duplicates_are_refused_at_open(tmp_path, extra, error, match):
    (tmp_path / "cp.tar").write_bytes(tar_of(base_entries() + extra))
    with pytest.raises(error, match=match):
        open_archive(tmp_path / "cp.tar")


@pytest.mark.parametrize("member", [
    special("checkpoint/pages-2.img", tarfile.SYMTYPE, "/etc/shadow"),
    special("checkpoint/pages-2.img", tarfile.LNKTYPE, "config.dump"),
    special("checkpoint/tty", tarfile.CHRTYPE),
    special("checkpoint/fifo", tarfile.FIFOTYPE),
])
def test_checkpoint_images_must_be_plain_files(tmp_path, member):
    (tmp_path / "cp.tar").write_bytes(tar_of(base_entries() + [(member.name, member)]))
    with open_archive(tmp_path / "cp.tar") as cp:
        with pytest.raises(UnsafeArchive, match="regular files and directories"):
            cp.extract_checkpoint_images(tmp_path / "img")
    assert os.listdir(tmp_path / "img") == []  # refused from the index, before any write


def test_checkpoint_images_are_size_bounded_and_need_an_empty_destination(tmp_path):
    (tmp_path / "cp.tar").write_bytes(tar_of(base_entries()))
    with open_archive(tmp_path / "cp.tar") as cp:
        with pytest.raises(ArchiveLimitExceeded):
            cp.extract_checkpoint_images(tmp_path / "img", Limits(max_total_bytes=100_000))
        assert os.listdir(tmp_path / "img") == []
        (tmp_path / "img" / "stale").write_bytes(b"")
        with pytest.raises(ArchiveError, match="not empty"):
            cp.extract_checkpoint_images(tmp_path / "img")
    with pytest.raises(ArchiveLimitExceeded):
        open_archive(tmp_path / "cp.tar", Limits(max_entries=3))


def test_oversized_metadata_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_mod, "MAX_METADATA_BYTES", 10)
    (tmp_path / "cp.tar").write_bytes(tar_of(base_entries()))
    with pytest.raises(ArchiveFormatError, match="config.dump is 24 bytes"):
        open_archive(tmp_path / "cp.tar")


def test_unknown_and_non_file_members_are_format_errors(tmp_path):
    (tmp_path / "cp.tar").write_bytes(tar_of(base_entries()))
    with open_archive(tmp_path / "cp.tar") as cp:
        with pytest.raises(ArchiveFormatError, match="no member 'rootfs-diff.tar'"):
            cp.extract_member("rootfs-diff.tar", tmp_path / "d")
        with pytest.raises(ArchiveFormatError, match="not a regular file"):
            cp.extract_member("checkpoint", tmp_path / "d")
        assert cp.rootfs_diff_size() == 0 and cp.log_member() is None


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_write_archive_returns_the_digests_of_what_it_wrote(tmp_path, compression):
    out = tmp_path / "cp.tar"
    written = write_archive(out, prepare_members(tmp_path), compression)
    data = out.read_bytes()
    assert written.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert written.size == len(data)
    plain = {"none": lambda b: b, "gzip": gzip.decompress,
             "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)}[compression](data)
    assert written.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert archive_mod.ArchiveDigest.from_json(written.to_json()) == written


def test_a_throwaway_archive_is_not_fsynced_but_still_appears_whole(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(archive_mod.os, "fsync", lambda fd: synced.append(fd))
    out = tmp_path / "cp.tar"
    write_archive(out, prepare_members(tmp_path), durable=False)
    assert synced == []
    with open_archive(out) as cp:
        assert cp.config().id == "c0ffee"
    write_archive(tmp_path / "durable.tar", prepare_members(tmp_path / "again"))
    assert len(synced) == 2  # the file and its directory


@pytest.mark.parametrize("doc", [None, "x", {}, {"digest": "sha256:ab", "diffId": "sha256:ab", "size": 1},
                                 {"digest": "sha256:" + "a" * 64, "diffId": "md5:" + "a" * 32, "size": 1},
                                 {"digest": "sha256:" + "a" * 64, "diffId": "sha256:" + "a" * 64, "size": -1}])
def test_a_malformed_archive_digest_is_no_digest(doc):
    assert archive_mod.ArchiveDigest.from_json(doc) is None


def test_a_plain_archive_is_the_tar_tarfile_writes_of_the_same_members(tmp_path):
    """The plain archive's members are copied by the kernel (plain_tar_writer); its bytes stay tarfile's,
    which checkpointctl, Podman and CRI-O read."""
    members = prepare_members(tmp_path)
    out = tmp_path / "cp.tar"
    written = write_archive(out, members)
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for info, source in archive_mod._archive_entries(members):
            archive_mod._add_with_tarfile(tar, info, source)
    assert out.read_bytes() == expected.getvalue()
    assert written.digest == written.diff_id == "sha256:" + hashlib.sha256(expected.getvalue()).hexdigest()


# ---------------------------------------------------------------- plain tars: content read in place

def test_a_plain_tar_is_read_in_place_and_gives_what_the_stream_gives(tmp_path):
    members = prepare_members(tmp_path)
    plain, zstd = tmp_path / "plain.tar", tmp_path / "cp.tar.zst"
    write_archive(plain, members, "none")
    write_archive(zstd, members, "zstd")
    trees = {}
    for path in (plain, zstd):
        with open_archive(path) as cp:
            dest = tmp_path / f"img-{path.name}"
            assert cp.extract_checkpoint_images(dest) == sum(map(len, IMAGES.values()))
            trees[path.name] = {p.name: p.read_bytes() for p in dest.iterdir()}
            with cp.open_member("dump.log") as f:
                assert f.read() == b"criu says hi\n"
            cp.extract_member("rootfs-diff.tar", tmp_path / f"diff-{path.name}")
    assert trees["plain.tar"] == trees["cp.tar.zst"] == IMAGES
    assert (tmp_path / "diff-plain.tar").read_bytes() == (members / "rootfs-diff.tar").read_bytes()
    with open_archive(plain) as cp:
        assert all(cp._members[f"checkpoint/{n}"].offset > 0 for n in IMAGES), "no offsets: not read in place"


def test_a_plain_tar_cut_short_after_it_was_indexed_is_an_archive_error(tmp_path):
    plain = tmp_path / "plain.tar"
    write_archive(plain, prepare_members(tmp_path), "none")
    with open_archive(plain) as cp:
        pages = cp._members["checkpoint/pages-1.img"]
        os.truncate(plain, pages.offset + 1000)  # the same inode, now short
        with pytest.raises(ArchiveFormatError, match="truncated|ends"):
            cp.extract_checkpoint_images(tmp_path / "img")
        with pytest.raises(ArchiveFormatError):
            with cp.open_member("dump.log") as f:
                f.read()
