"""criu_glue.inspect against real CRIU checkpoints of a real process tree (root, criu and crit
needed for those), and against hand-packed archives in the CRI-O, Podman, containerd and pyshim
layouts for the metadata side (no root needed)."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from criu_glue import inspect as ins
from criu_glue.errors import ArchiveError, ArchiveFormatError

ROOT = os.geteuid() == 0
HAVE_CRIU = shutil.which("criu") is not None and Path(ins.CRIT).exists()
needs_criu = pytest.mark.skipif(not (ROOT and HAVE_CRIU), reason="needs root, criu and crit")

CONTAINER_ID = "5f1c0e9a2b7d4c3e8f6a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6"
IMAGE_ID = "sha256:" + "ab" * 32


# ---------------------------------------------------------------- a real CRIU checkpoint

def _wait_for_child(pid: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.02)
    raise AssertionError(f"process {pid} started no child")


@pytest.fixture(scope="module")
def criu_images(tmp_path_factory):
    """A CRIU image directory of `sh` (session leader, stdio on /dev/null) with a `sleep` child,
    dumped with --leave-running; both processes are killed before the tests use the images."""
    if not (ROOT and HAVE_CRIU):
        pytest.skip("needs root, criu and crit")
    work = tmp_path_factory.mktemp("criu")
    images = work / "checkpoint"
    images.mkdir()
    proc = subprocess.Popen(["sh", "-c", "sleep 1000 & wait"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd="/")
    try:
        child = _wait_for_child(proc.pid)
        time.sleep(0.1)  # let the child exec sleep (comm changes at exec)
        dump = subprocess.run(["criu", "dump", "-t", str(proc.pid), "-D", str(images), "-o", "dump.log",
                               "--shell-job", "--leave-running"], capture_output=True, text=True, timeout=120)
        if dump.returncode != 0:
            log = (images / "dump.log").read_text(errors="replace")[-3000:] if (images / "dump.log").exists() else ""
            pytest.skip(f"criu dump failed here (rc {dump.returncode}): {dump.stderr[-500:]} {log}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    for name in ("dump.log", "stats-dump"):  # archives keep these at the top level
        if (images / name).exists():
            (images / name).rename(work / name)
    yield {"dir": images, "work": work, "sh": proc.pid, "sleep": child}


def _config(name="counter", runtime="runc", **extra) -> dict:
    doc = {"id": CONTAINER_ID, "name": name, "rootfsImage": "quay.io/example/counter:latest",
           "rootfsImageRef": IMAGE_ID, "rootfsImageName": "quay.io/example/counter:latest",
           "runtime": runtime, "createdTime": "2025-05-22T14:31:24.818422898Z",
           "checkpointedTime": "2025-05-22T14:35:01.5Z", "restoredTime": "0001-01-01T00:00:00Z",
           "restored": False}
    doc.update(extra)
    return doc


CRIO_ANNOTATIONS = {
    "io.container.manager": "cri-o",
    "io.kubernetes.cri-o.Metadata": json.dumps({"name": "counter", "attempt": 0}),
    "io.kubernetes.pod.name": "counters",
    "io.kubernetes.pod.namespace": "default",
    "io.kubernetes.cri-o.IP.0": "10.0.0.70",
    "io.kubernetes.cri-o.Created": "2025-05-22T14:31:24.818422898Z",
}
PODMAN_ANNOTATIONS = {"io.container.manager": "libpod", "org.opencontainers.image.stopSignal": "15"}
CRI_ANNOTATIONS = {
    "io.kubernetes.cri.container-type": "container",
    "io.kubernetes.cri.container-name": "counter",
    "io.kubernetes.cri.sandbox-name": "counters",
    "io.kubernetes.cri.sandbox-namespace": "prod",
}
PODMAN_NETWORK = {"podman": {"interfaces": {"eth0": {"subnets": [{"ipnet": "10.88.0.9/16", "gateway": "10.88.0.1"}],
                                                       "mac_address": "f2:99:8d:fb:5a:57"}}}}


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def _rootfs_diff() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        _add_bytes(t, "etc/motd", b"changed in the container\n" * 40)
    return buf.getvalue()


def pack(path: Path, images: Path | None, *, annotations: dict, config: dict | None | bytes = None,
         compression: str = "none", extra: dict[str, bytes] | None = None, spec: bytes | None = None) -> Path:
    """A checkpoint archive by hand: checkpoint/ (a real directory entry) with the CRIU images
    (or a fake inventory.img when `images` is None), config.dump, spec.dump, rootfs-diff.tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("checkpoint")
        d.type = tarfile.DIRTYPE
        d.mode = 0o700
        tar.addfile(d)
        if images is None:
            _add_bytes(tar, "checkpoint/inventory.img", b"\0" * 64)
            _add_bytes(tar, "checkpoint/pages-1.img", b"\1" * 8192)
        else:
            for f in sorted(images.iterdir()):
                tar.add(str(f), arcname=f"checkpoint/{f.name}", recursive=False)
        if config is not None:
            _add_bytes(tar, "config.dump", config if isinstance(config, bytes) else json.dumps(config).encode())
        _add_bytes(tar, "spec.dump", spec if spec is not None else
                   json.dumps({"ociVersion": "1.0.2", "process": {"args": ["sh"]},
                               "annotations": annotations}).encode())
        _add_bytes(tar, "rootfs-diff.tar", _rootfs_diff())
        for name, data in (extra or {}).items():
            _add_bytes(tar, name, data)
    data = buf.getvalue()
    if compression == "gzip":
        data = gzip.compress(data)
    elif compression == "zstd":
        zstandard = pytest.importorskip("zstandard")
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Every temporary directory inspect makes lands here, so the tests can see it is removed."""
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


# ---------------------------------------------------------------- real images

@needs_criu
def test_inspect_images_finds_the_process_tree_files_and_memory(criu_images):
    report = ins.inspect_images(criu_images["dir"])
    assert report.warnings == []
    sh, sleep = report.find(criu_images["sh"]), report.find(criu_images["sleep"])
    assert sh is not None and sleep is not None
    assert [p.pid for p in report.roots] == [sh.pid]
    assert sh.command == "sh" and sh.depth == 0 and sh.children == [sleep.pid]
    assert sleep.command == "sleep" and sleep.ppid == sh.pid and sleep.depth == 1
    assert sleep.state == "alive" and sleep.threads == [sleep.pid]
    assert sh.sid == sh.pid == sh.pgid
    assert sleep.exe.endswith("/sleep")
    files = {f.fd: f for f in sleep.files}
    assert files["0"].path == files["1"].path == files["2"].path == "/dev/null"
    assert files["0"].type == "REG"
    assert files["cwd"].path == "/" and files["root"].path == "/"
    mem = sleep.memory
    assert mem.vmas > 0 and mem.virtual_bytes > 0
    assert mem.memory_bytes > 0 and mem.image_bytes > 0 and mem.image_bytes % ins.PAGE_SIZE == 0
    assert mem.pages_image.startswith("pages-") and mem.pages_image_size >= mem.image_bytes
    assert mem.virtual_bytes >= mem.memory_bytes


@needs_criu
def test_inspect_images_without_files_or_memory_decodes_only_the_tree(criu_images):
    report = ins.inspect_images(criu_images["dir"], files=False, memory=False)
    assert {p.command for p in report.processes} == {"sh", "sleep"}
    assert all(p.files is None and p.memory is None for p in report.processes)


def test_inspect_images_of_a_directory_without_pstree_is_a_clean_error(tmp_path):
    with pytest.raises(ins.InspectError, match="pstree.img"):
        ins.inspect_images(tmp_path)


@needs_criu
def test_crio_archive_summary_and_inspection(criu_images, tmp_path, private_tmp, monkeypatch):
    archive = pack(tmp_path / "checkpoint-counters_default-counter.tar", criu_images["dir"],
                   annotations=CRIO_ANNOTATIONS, config=_config(name="k8s_counter_counters_default"))
    s = ins.summarize(archive)
    assert s.engine == "CRI-O"
    assert (s.container_name, s.pod_name, s.namespace) == ("counter", "counters", "default")
    assert s.ip == "10.0.0.70" and s.created == "2025-05-22T14:31:24.818422898Z"
    assert s.container_id == CONTAINER_ID and s.runtime == "runc"
    assert s.image_name == "quay.io/example/counter:latest" and s.image_id == IMAGE_ID == s.image_ref
    assert s.checkpointed == "2025-05-22T14:35:01Z" and s.compression == "none"
    images_bytes = sum(f.stat().st_size for f in criu_images["dir"].iterdir())
    assert s.checkpoint_size == images_bytes > 0
    assert 0 < s.memory_pages_size < s.checkpoint_size
    assert s.rootfs_diff_size == len(_rootfs_diff()) > 0
    assert s.archive_size == archive.stat().st_size

    seen = {}
    real = ins.inspect_images

    def spy(directory, **kw):
        seen["files"] = sorted(os.listdir(directory))
        seen["mode"] = Path(directory).stat().st_mode & 0o777
        return real(directory, **kw)

    summary, report = ins.inspect_archive(archive)
    assert summary == s
    sleep = report.find(criu_images["sleep"])
    assert sleep.command == "sleep" and sleep.memory.image_bytes > 0
    # the pages image is sized from the archive's index, not unpacked
    assert sleep.memory.pages_image_size == (criu_images["dir"] / sleep.memory.pages_image).stat().st_size
    assert os.listdir(private_tmp) == []

    monkeypatch.setattr(ins, "inspect_images", spy)
    ins.inspect_archive(archive)
    assert "pstree.img" in seen["files"] and not [f for f in seen["files"] if f.startswith("pages-")]
    assert seen["mode"] == 0o700
    assert os.listdir(private_tmp) == []


@needs_criu
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_podman_archive_compressed(criu_images, tmp_path, private_tmp, compression):
    archive = pack(tmp_path / f"dump.tar.{compression}", criu_images["dir"], annotations=PODMAN_ANNOTATIONS,
                   config=_config(name="magical_murdock", runtime="crun"), compression=compression,
                   extra={"network.status": json.dumps(PODMAN_NETWORK).encode()})
    summary, report = ins.inspect_archive(archive, files=False)
    assert summary.engine == "Podman" and summary.compression == compression
    assert summary.container_name == "magical_murdock" and summary.runtime == "crun"
    assert summary.ip == "10.88.0.9/16" and summary.mac == "f2:99:8d:fb:5a:57"
    assert summary.created == "2025-05-22T14:31:24Z"
    assert summary.pod_name == "" and summary.namespace == ""
    assert report.find(criu_images["sleep"]).memory.memory_bytes > 0
    assert os.listdir(private_tmp) == []


@needs_criu
def test_main_text_and_json(criu_images, tmp_path, private_tmp, capsys):
    crio = pack(tmp_path / "crio.tar", criu_images["dir"], annotations=CRIO_ANNOTATIONS, config=_config())
    ours = pack(tmp_path / "pyshim.tar", criu_images["dir"], annotations=CRI_ANNOTATIONS,
                config=_config(engine="pyshim"))
    assert ins.main([str(crio), str(ours), "--all"]) == 0
    out = capsys.readouterr().out
    assert out.count("Displaying container checkpoint data from") == 2
    assert "CHKPT SIZE" in out and "ROOT FS DIFF SIZE" in out and "CRI-O" in out and "pyshim" in out
    assert "Process tree" in out and "└─ sleep" in out and "/dev/null" in out and "pages-" in out
    assert CONTAINER_ID[:12] in out

    assert ins.main([str(ours), "--ps", "--json"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert len(docs) == 1
    doc = docs[0]
    assert doc["engine"] == "pyshim" and doc["container_name"] == "counter"
    assert doc["pod_name"] == "counters" and doc["namespace"] == "prod"
    assert doc["checkpoint_size"]["total_size"] > 0 and doc["checkpoint_size"]["root_fs_diff_size"] > 0
    tree = doc["process_tree"]
    assert tree["command"] == "sh" and tree["children"][0]["command"] == "sleep"
    assert "file_descriptors" not in doc and "memory" not in doc

    assert ins.main([str(ours), "--files", "--mem", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)[0]
    fds = {d["pid"]: d["open_files"] for d in doc["file_descriptors"]}
    assert {"fd": "0", "type": "REG", "path": "/dev/null"} in fds[criu_images["sleep"]]
    mem = {m["pid"]: m for m in doc["memory"]}
    assert mem[criu_images["sleep"]]["memory_bytes"] > 0
    assert os.listdir(private_tmp) == []


@needs_criu
def test_crit_failure_is_an_error_and_still_removes_the_temp_dir(criu_images, tmp_path, private_tmp):
    archive = pack(tmp_path / "a.tar", criu_images["dir"], annotations=CRIO_ANNOTATIONS, config=_config())
    with pytest.raises(ins.InspectError, match="not installed"):
        ins.inspect_archive(archive, crit=str(tmp_path / "no-crit"))
    assert os.listdir(private_tmp) == []


# ---------------------------------------------------------------- metadata only (no root)

def test_engine_detection(tmp_path):
    crio = ins.summarize(pack(tmp_path / "crio.tar", None, annotations=CRIO_ANNOTATIONS, config=_config()))
    podman = ins.summarize(pack(tmp_path / "podman.tar", None, annotations=PODMAN_ANNOTATIONS,
                                config=_config(name="looper")))
    containerd = ins.summarize(pack(tmp_path / "ctrd.tar", None, annotations=CRI_ANNOTATIONS, config=_config()))
    ours = ins.summarize(pack(tmp_path / "ours.tar", None, annotations=CRI_ANNOTATIONS,
                              config=_config(engine="pyshim")))
    assert (crio.engine, podman.engine, containerd.engine, ours.engine) == ("CRI-O", "Podman", "containerd", "pyshim")
    assert podman.container_name == "looper" and podman.ip == ""
    assert (containerd.container_name, containerd.pod_name, containerd.namespace) == ("counter", "counters", "prod")
    assert ours.pod_name == "counters"
    for s in (crio, podman, containerd, ours):
        assert s.checkpoint_size == 64 + 8192 and s.memory_pages_size == 8192
        assert s.rootfs_diff_size > 0


def test_podman_config_shape_gives_image_id_and_no_checkpoint_time(tmp_path):
    # What Podman 5.4 really writes (integration/test_podman_archives.py): no rootfsImage,
    # rootfsImageRef or checkpointedTime; the image ID is rootfsImageID, bare hex.
    config = {"id": CONTAINER_ID, "name": "counter1", "rootfsImageID": IMAGE_ID.removeprefix("sha256:"),
              "rootfsImageName": "127.0.0.1:5000/busybox:latest", "runtime": "runc",
              "createdTime": "2026-11-21T06:59:04.871689023Z", "lockID": 0, "spec": {"ociVersion": "1.2.0"}}
    s = ins.summarize(pack(tmp_path / "podman.tar", None, annotations=PODMAN_ANNOTATIONS, config=config))
    assert s.engine == "Podman" and s.container_name == "counter1"
    assert s.image_name == "127.0.0.1:5000/busybox:latest" and s.image_requested == s.image_ref == ""
    assert s.image_id == IMAGE_ID.removeprefix("sha256:")
    assert s.checkpointed == "" and s.checkpointed_time_ns is None
    assert s.created == "2026-11-21T06:59:04Z"


def test_no_annotations_falls_back_to_config_name(tmp_path):
    s = ins.summarize(pack(tmp_path / "a.tar", None, annotations={}, config=_config(name="plain")))
    assert s.engine == "containerd" and s.container_name == "plain"


def test_crio_with_bad_metadata_annotation_is_a_clean_error(tmp_path):
    bad = dict(CRIO_ANNOTATIONS, **{"io.kubernetes.cri-o.Metadata": "{not json"})
    with pytest.raises(ArchiveFormatError, match="io.kubernetes.cri-o.Metadata"):
        ins.summarize(pack(tmp_path / "a.tar", None, annotations=bad, config=_config()))


def test_deeply_nested_metadata_is_a_clean_error_or_ignored(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    bad = dict(CRIO_ANNOTATIONS, **{"io.kubernetes.cri-o.Metadata": deep})
    with pytest.raises(ArchiveFormatError, match="io.kubernetes.cri-o.Metadata"):
        ins.summarize(pack(tmp_path / "a.tar", None, annotations=bad, config=_config()))
    podman = ins.summarize(pack(tmp_path / "p.tar", None, annotations=PODMAN_ANNOTATIONS, config=_config(),
                                extra={"network.status": deep.encode()}))
    assert podman.ip == ""


def test_human_size():
    assert ins.human_size(204) == "204 B"
    assert ins.human_size(133939) == "130.8 KiB"
    assert ins.human_size(9646899) == "9.2 MiB"
    assert ins.human_size(3 << 30) == "3.0 GiB"


def test_render_text_without_report(tmp_path):
    s = ins.summarize(pack(tmp_path / "a.tar", None, annotations=CRIO_ANNOTATIONS, config=_config()))
    text = ins.render_text(s)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("CONTAINER"))
    for column in ("IMAGE", "ID", "RUNTIME", "CREATED", "ENGINE", "IP", "CHKPT SIZE", "ROOT FS DIFF SIZE"):
        assert column in header
    row = lines[lines.index(header) + 2]
    assert row.split()[:4] == ["counter", "quay.io/example/counter:latest", CONTAINER_ID[:12], "runc"]
    assert "Pod:" in text and "counters" in text and "Process tree" not in text


def test_missing_file_not_an_archive_and_missing_config(tmp_path, capsys, private_tmp):
    assert ins.main([str(tmp_path / "nope.tar")]) == 1
    assert "nope.tar: no such file" in capsys.readouterr().err

    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(3000))
    assert ins.main([str(junk), "--all"]) == 1
    err = capsys.readouterr().err
    assert "junk.tar" in err and "Traceback" not in err

    no_config = pack(tmp_path / "noconfig.tar", None, annotations=CRIO_ANNOTATIONS, config=None)
    assert ins.main([str(no_config)]) == 1
    assert "config.dump" in capsys.readouterr().err
    with pytest.raises(ArchiveFormatError, match="config.dump"):
        ins.summarize(no_config)

    corrupt = pack(tmp_path / "corrupt.tar", None, annotations=CRIO_ANNOTATIONS, config=b"{\"id\": ")
    assert ins.main([str(corrupt), "--json"]) == 1
    captured = capsys.readouterr()
    assert "config.dump" in captured.err and json.loads(captured.out) == []

    bad_spec = pack(tmp_path / "badspec.tar", None, annotations={}, config=_config(), spec=b"[1, 2]")
    with pytest.raises(ArchiveError, match="spec.dump"):
        ins.summarize(bad_spec)

    assert ins.main([str(tmp_path)]) == 1
    assert "directory" in capsys.readouterr().err
    assert os.listdir(private_tmp) == []


def test_one_bad_archive_does_not_hide_the_good_ones(tmp_path, capsys):
    good = pack(tmp_path / "good.tar", None, annotations=CRI_ANNOTATIONS, config=_config())
    assert ins.main([str(tmp_path / "missing.tar"), str(good)]) == 1
    captured = capsys.readouterr()
    assert "missing.tar" in captured.err and "good.tar" in captured.out
