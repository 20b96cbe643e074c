"""Real Podman 5 checkpoint archives (`podman container checkpoint --export`, --compress none,
gzip and zstd) read by criu_glue: the reader is checked against the real producer, not against
what we believe it writes. Skipped, with the reason, where Podman 5 is not installed.

What Podman 5.4.2 (Debian trixie, runc 1.1.5, CRIU 4.2.1, cgroup v1) writes, as seen here:

Members, in this order (a ustar tar; no "./" prefixes, no "." entry):
    artifacts/              empty directory
    devshm-checkpoint.tar   the container's /dev/shm (a tar holding only "./")
    config.dump  spec.dump  network.status  stats-dump  ctr.log
    checkpoint/             a real directory entry (mode 0600 as written), then the CRIU images:
                            inventory.img, pstree.img, core-N.img, mm-N.img, pagemap-N.img,
                            pages-N.img, files.img, fdinfo-N.img, fs-N.img, ids-N.img,
                            mountpoints-13.img, cgroup.img, seccomp.img, timens-0.img,
                            utsns-12.img, ipcns-var-11.img, tmpfs-dev-NN.tar.gz.img (the /dev
                            tmpfs), and runc's descriptors.json
    rootfs-diff.tar  deleted.files   last, and only when the writable layer changed
Not written: dump.log (Podman keeps it in its own state until the container is removed),
bind.mounts, status.dump, container.log, pod.options/pod.dump (only for containers in pods).

config.dump is libpod's whole ContainerConfig (~24 KB of JSON, indented), not checkpointctl's
struct. Its keys: spec (the spec at creation), id, name, lockID, CreateCommand, RawImageName,
idMappingsOptions, Dependencies, rootfsImageID, rootfsImageName, ShmDir, shmSize,
shmSizeSystemd, staticDir, mounts (a list of host paths), createWorkingDir, secretsPath,
storageOpts, passwd, privileged, labelopts, label_nested, createNetNS, UseImageResolvConf,
useImageHostname, UseImageHosts, command, stopSignal, stopTimeout, createdTime,
cgroupManager, cgroupsMode, cgroupParent, kubeExitCodePropagation, logPath, logTag, logSize,
logDriver, conmonPidFile, postConfigureNetNS, runtime, pause, isService, sdnotifyMode,
healthcheck, healthcheck_on_failure_action, healthLogDestination, healthMaxLogCount,
healthMaxLogSize, umask, pid_file, mountAllDevices, readWriteTmpfs.
- rootfsImageID is the image ID as bare hex (no "sha256:"); rootfsImageName and RawImageName
  are the name as pulled ("127.0.0.1:PORT/busybox:latest", a tag, not a digest reference).
- There is no rootfsImage, no rootfsImageRef, no checkpointedTime, restoredTime or restored
  (Podman keeps CheckpointedAt in its own state, not in the archive). "runtime" is the runtime's
  name as configured ("runc"), createdTime RFC 3339 with nanoseconds.

spec.dump is the OCI runtime config as run. Annotations: io.container.manager=libpod (how
checkpointctl and criu_glue.inspect tell Podman), org.opencontainers.image.stopSignal=15,
org.systemd.property.KillSignal=15, org.systemd.property.TimeoutStopUSec="uint64 10000000".
Its bind mounts, which CRIU records as external mounts a restore must map again, are /etc/hosts,
/etc/hostname, /run/.containerenv and /dev/shm (with --network none there is no resolv.conf).

ctr.log is the log copy (k8s-file log driver, the CRI log format: "<RFC 3339 nanos+00:00>
stdout F tick 3"). network.status is "null" with --network none. stats-dump is CRIU's.

deleted.files is an indented JSON list of absolute container paths: '[\\n  "/etc/group"\\n]'.
rootfs-diff.tar is a plain (uncompressed) tar of what was added or changed, names relative
without "./" ("root/added-before-checkpoint", "tmp/counter"), holding new directories,
symlinks and changed files, but no entries for directories that merely changed (/etc, /tmp).

--compress gzip and zstd compress that same tar as a whole (the default, without --compress,
is zstd); the member names do not change with the compression.

The CRIU images hold the container's own network namespace (--network none: the spec names a
network namespace without a path, so runc creates it), yet no netns-*/netdev-* image is in the
archive. Its mountpoints image lists /etc/hosts, /etc/hostname, /run/.containerenv and /dev/shm
as external bind mounts: a restore must give the new container mounts at those destinations.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from criu_glue import inspect as ins
from criu_glue.archive import open_archive
from criu_glue.rootfs_diff import apply_rootfs_diff
from integration import podman as pm

pytestmark = pytest.mark.integration

SUFFIX = {"none": ".tar", "gzip": ".tar.gz", "zstd": ".tar.zst"}
TOP_LEVEL = ["artifacts", "devshm-checkpoint.tar", "config.dump", "spec.dump", "network.status",
             "stats-dump", "ctr.log", "checkpoint", "rootfs-diff.tar", "deleted.files"]
PODMAN_BIND_MOUNTS = {"/etc/hosts", "/etc/hostname", "/run/.containerenv", "/dev/shm"}


@dataclass
class Produced:
    path: Path
    container_id: str
    name: str
    last_tick: int
    image_ref: str
    image_id: str


@pytest.fixture(scope="module")
def podman():
    ok = pm.available()
    if not ok:
        pytest.skip(f"Podman 5 is not usable here: {ok.reason}")
    had_var_lib_containers = os.path.exists("/var/lib/containers")
    with pm.Podman() as p:
        yield p
        p.remove_all()
        left = p.leftovers()
    assert not left, f"Podman left these behind: {left}"
    assert os.path.exists("/var/lib/containers") == had_var_lib_containers


@pytest.fixture(scope="module")
def busybox(podman, request) -> str:
    """The test registry's busybox, asked for only once Podman is known to be usable: a
    session fixture named in the signature would be set up (or fail) before the skip."""
    return request.getfixturevalue("busybox_ref")


@pytest.fixture(scope="module")
def produced(podman, busybox, tmp_path_factory) -> dict[str, Produced]:
    """One stopped counter checkpoint per compression, from real Podman."""
    out = tmp_path_factory.mktemp("podman-archives")
    busybox_ref = busybox
    image_id = podman.pull(busybox_ref)
    archives = {}
    for compress in pm.COMPRESSIONS:
        name = f"counter-{compress}"
        cid = podman.run_counter(busybox_ref, name=name)
        path = podman.checkpoint_export(cid, out / f"{name}{SUFFIX[compress]}", compress=compress)
        assert podman.state(cid) == "exited"
        archives[compress] = Produced(path, cid, name, podman.last_tick(cid), busybox_ref, image_id)
    podman.remove_all()
    assert podman.leftovers() == []
    return archives


def _plain_tar(path: Path) -> tarfile.TarFile:
    """The archive as a tar, decompressed independently of criu_glue."""
    data = path.read_bytes()
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")


def _member(path: Path, name: str) -> bytes:
    with _plain_tar(path) as tar:
        return tar.extractfile(name).read()


compressions = pytest.mark.parametrize("compress", pm.COMPRESSIONS)


@compressions
def test_compression_is_what_was_asked_and_detected(produced, compress):
    magic = produced[compress].path.read_bytes()[:262]
    expected = {"none": magic[257:262] == b"ustar", "gzip": magic[:2] == b"\x1f\x8b",
                "zstd": magic[:4] == b"\x28\xb5\x2f\xfd"}[compress]
    assert expected
    with open_archive(produced[compress].path) as a:
        assert a.compression == compress


@compressions
def test_member_names_are_podmans(produced, compress):
    with open_archive(produced[compress].path) as a:
        names = a.member_names()
    top = [n for n in names if "/" not in n]
    assert top == TOP_LEVEL
    images = {n.split("/", 1)[1] for n in names if n.startswith("checkpoint/")}
    for image in ("inventory.img", "pstree.img", "core-1.img", "mm-1.img", "pagemap-1.img",
                  "pages-1.img", "files.img", "cgroup.img", "seccomp.img", "descriptors.json"):
        assert image in images
    assert any(n.startswith("mountpoints-") for n in images)
    with _plain_tar(produced[compress].path) as tar:
        kinds = {m.name: m.type for m in tar.getmembers()}
    assert kinds["checkpoint"] == kinds["artifacts"] == tarfile.DIRTYPE
    assert not any(n.startswith("./") for n in kinds)


@compressions
def test_config_dump(produced, compress):
    p = produced[compress]
    with open_archive(p.path) as a:
        config = a.config()
    raw = json.loads(_member(p.path, "config.dump"))
    assert (config.id, config.name, config.runtime) == (p.container_id, p.name, "runc")
    # Podman's own keys for the image, not checkpointctl's.
    assert "rootfsImageRef" not in raw and "rootfsImage" not in raw
    assert "checkpointedTime" not in raw and "restored" not in raw
    assert raw["rootfsImageID"] == p.image_id and len(p.image_id) == 64 and ":" not in p.image_id
    assert config.image_id == p.image_id
    assert config.rootfs_image_name == raw["RawImageName"] == p.image_ref
    assert config.rootfs_image == config.rootfs_image_ref == ""
    assert config.created_time_ns and config.checkpointed_time_ns is None and not config.restored
    assert raw["logDriver"] == "k8s-file" and raw["cgroupManager"] == "cgroupfs"
    assert raw["command"] == list(pm.COUNTER_COMMAND) and isinstance(raw["spec"], dict)


@compressions
def test_spec_dump(produced, compress):
    with open_archive(produced[compress].path) as a:
        spec = a.spec()
    assert spec["annotations"]["io.container.manager"] == "libpod"
    assert spec["process"]["args"] == list(pm.COUNTER_COMMAND)
    binds = {m["destination"] for m in spec["mounts"] if m.get("type") == "bind"}
    assert binds == PODMAN_BIND_MOUNTS
    assert {"type": "network"} in spec["linux"]["namespaces"]  # --network none: runc's own netns


@compressions
def test_metadata_members(produced, compress):
    p = produced[compress]
    with open_archive(p.path) as a:
        assert a.deleted_files() == [pm.DELETED_FILE]
        assert a.bind_mounts() == []  # Podman writes no bind.mounts: see spec.dump's mounts
        assert a.status() is None
        assert a.metadata_member("network.status") == b"null"
    assert _member(p.path, "deleted.files") == b'[\n  "/etc/group"\n]'


@compressions
def test_log_copy_is_ctr_log_in_cri_format(produced, compress):
    p = produced[compress]
    with open_archive(p.path) as a:
        assert a.log_member() == "ctr.log"
        with a.open_member("ctr.log") as f:
            lines = f.read().decode().splitlines()
    assert lines[0].endswith(" stdout F tick 0")
    assert lines[-1].endswith(f" stdout F tick {p.last_tick}")
    stamp, stream, tag, _ = lines[-1].split(" ", 3)
    assert (stream, tag) == ("stdout", "F") and stamp.endswith("+00:00")


@compressions
def test_sizes_match_the_tar(produced, compress):
    p = produced[compress]
    with _plain_tar(p.path) as tar:
        infos = tar.getmembers()
    images = sum(m.size for m in infos if m.isreg() and m.name.startswith("checkpoint/"))
    diff = next(m.size for m in infos if m.name == "rootfs-diff.tar")
    with open_archive(p.path) as a:
        assert a.checkpoint_size() == images > 0
        assert a.rootfs_diff_size() == diff > 0


@compressions
def test_rootfs_diff_is_a_plain_tar_our_applier_takes(produced, compress, tmp_path):
    p = produced[compress]
    with open_archive(p.path) as a:
        a.extract_member("rootfs-diff.tar", tmp_path / "diff.tar")
        deleted = a.deleted_files()
    assert (tmp_path / "diff.tar").read_bytes()[257:262] == b"ustar"  # not compressed
    with tarfile.open(tmp_path / "diff.tar") as diff:
        names = sorted(diff.getnames())
        raw = diff.extractfile(pm.COUNTER_FILE.lstrip("/")).read()
    assert names == sorted([pm.ADDED_FILE.lstrip("/"), pm.COUNTER_FILE.lstrip("/")])
    # Frozen after writing the file, maybe before logging the tick; or between the shell's truncation
    # of the file (`echo $i > file`) and its write (CI saw that once): then it is empty, as it was.
    assert raw == b"" or int(raw) in (p.last_tick, p.last_tick + 1), (raw, p.last_tick)

    rootfs = tmp_path / "rootfs"  # the image's directories and files the diff touches
    for d in ("etc", "root", "tmp"):
        (rootfs / d).mkdir(parents=True)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    apply_rootfs_diff(tmp_path / "diff.tar", deleted, rootfs)
    assert not (rootfs / "etc/group").exists() and (rootfs / "etc/passwd").exists()
    assert (rootfs / pm.ADDED_FILE.lstrip("/")).read_text() == pm.ADDED_CONTENT
    assert (rootfs / pm.COUNTER_FILE.lstrip("/")).read_bytes() == raw


@compressions
def test_extract_checkpoint_images(produced, compress, tmp_path):
    dest = tmp_path / "images"
    with open_archive(produced[compress].path) as a:
        written = a.extract_checkpoint_images(dest)
        assert written == a.checkpoint_size()
    for image in ("inventory.img", "pstree.img", "core-1.img", "pages-1.img", "files.img"):
        assert (dest / image).is_file()
        assert (dest / image).stat().st_mode & 0o777 == 0o600
    if not os.access(ins.CRIT, os.X_OK):
        pytest.skip("crit is not installed: the images were unpacked but not decoded")
    report = ins.inspect_images(dest)
    # The shell is PID 1 of the container's PID namespace; the freeze usually finds it waiting
    # for a `sleep 0.1` child, but may catch it between two.
    root, *children = report.processes
    assert (root.pid, root.ppid, root.command) == (1, 0, "sh")
    assert [(c.ppid, c.command) for c in children] in ([], [(1, "sleep")])


@compressions
def test_inspect_shows_name_image_and_process_tree(produced, compress, capsys):
    p = produced[compress]
    assert ins.main([str(p.path), "--ps", "--json"]) == 0
    [doc] = json.loads(capsys.readouterr().out)
    assert doc["engine"] == "Podman" and doc["container_name"] == p.name
    assert doc["image"] == p.image_ref and doc["image_id"] == p.image_id
    assert doc["id"] == p.container_id and doc["runtime"] == "runc"
    assert doc["compression"] == compress and doc["checkpointed"] == ""
    tree = doc["process_tree"]
    assert tree["command"] == "sh" and tree["pid"] == 1
    assert [c["command"] for c in tree.get("children", [])] in ([], ["sleep"])

    cli = subprocess.run([sys.executable, "-m", "criu_glue.inspect", "--ps", str(p.path)],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    for text in (p.name, p.image_ref, p.container_id[:12], "Podman", "Process tree", " sh"):
        assert text in cli.stdout


@compressions
def test_checkpointctl_agrees(produced, compress):
    if shutil.which("checkpointctl") is None:
        pytest.skip("checkpointctl is not installed")
    p = produced[compress]
    out = subprocess.run(["checkpointctl", "show", str(p.path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert p.name in out.stdout and p.image_ref in out.stdout and "Podman" in out.stdout


def test_leave_running_checkpoint_and_cleanup(podman, busybox, tmp_path):
    cid = podman.run_counter(busybox)
    path = podman.checkpoint_export(cid, tmp_path / "running.tar", leave_running=True)
    assert podman.state(cid) == "running"
    with open_archive(path) as a:
        assert a.config().id == cid and a.deleted_files() == [pm.DELETED_FILE]
    assert podman.leftovers() != []  # the running container, seen
    podman.remove_all()
    assert podman.leftovers() == []
