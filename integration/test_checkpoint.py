"""CheckpointContainer end to end: real runc + CRIU, the archive other tools read, and bad input."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as cri
from integration.conftest import discard, new_settings, pod_config
from integration.daemon import Daemon, DaemonSettings, leftovers, remove_everything
from integration.test_lifecycle import cleanup, run_container, wait_for_state

COUNTER = "i=0; while true; do echo $i > /tmp/counter; echo tick $i; i=$((i+1)); sleep 0.1; done"


def checkpoint(client, cid, location, timeout=120):
    client.runtime.CheckpointContainer(cri.CheckpointContainerRequest(
        container_id=cid, location=str(location), timeout=timeout), timeout=timeout + 10)


def counter_value(client, cid) -> int:
    # The loop truncates the file before writing it: an empty read is a read in between.
    for _ in range(40):
        out = client.exec_sync(cid, ["cat", "/tmp/counter"]).stdout.strip()
        if out:
            return int(out)
        time.sleep(0.05)
    raise AssertionError("the container's counter file stayed empty")


def read_member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        return tar.extractfile(name).read()


@pytest.fixture
def archive_dir(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir(mode=0o700)
    return d


def private_log_pod(tmp_path):
    """A pod whose logs live in this test's own directory: conftest's shared log root is removed at
    the end of every test session, including sessions other people run on the same machine."""
    return pod_config(log_directory=str(tmp_path / "pod-logs"))


def test_checkpoint_writes_the_shared_archive_format_and_container_keeps_running(client, pulled_busybox, archive_dir,
                                                                                 tmp_path):
    pod, pod_id, cid = run_container(client, pulled_busybox,
                                     ["sh", "-c", f"rm /etc/group; echo note > /root-note; {COUNTER}"],
                                     pod=private_log_pod(tmp_path))
    try:
        time.sleep(1)
        location = archive_dir / "checkpoint-pod_default-main-2026-11-21T06:00:00Z.tar"
        checkpoint(client, cid, location)
        assert stat.S_IMODE(location.stat().st_mode) == 0o600
        assert [p.name for p in archive_dir.iterdir()] == [location.name], "temporary files left behind"

        before = counter_value(client, cid)
        time.sleep(0.6)
        assert counter_value(client, cid) > before, "container stopped making progress after the checkpoint"
        assert client.status(cid).status.state == cri.CONTAINER_RUNNING

        with tarfile.open(location) as tar:
            members = {m.name.rstrip("/"): m for m in tar.getmembers()}
        assert members["checkpoint"].isdir(), "checkpointctl needs a real checkpoint/ directory entry"
        assert {"checkpoint/inventory.img", "checkpoint/pstree.img", "config.dump", "spec.dump", "status.dump",
                "dump.log", "stats-dump", "rootfs-diff.tar", "deleted.files", "bind.mounts",
                "container.log"} <= set(members)
        config = json.loads(read_member(location, "config.dump"))
        assert config["id"] == cid and config["name"] == "main" and config["rootfsImageName"]
        assert config["checkpointedTime"] and config["createdTime"]
        spec = json.loads(read_member(location, "spec.dump"))
        assert spec["annotations"]["io.kubernetes.cri.container-name"] == "main"
        assert spec["annotations"]["io.kubernetes.cri.sandbox-name"] == pod.metadata.name
        assert spec["annotations"]["io.kubernetes.cri.sandbox-namespace"] == "default"
        status = json.loads(read_member(location, "status.dump"))
        assert status["id"] == cid
        assert "etc/group" in {p.lstrip("/") for p in json.loads(read_member(location, "deleted.files"))}
        diff = tarfile.open(fileobj=__import__("io").BytesIO(read_member(location, "rootfs-diff.tar")))
        names = {n.lstrip("./") for n in diff.getnames()}
        assert "root-note" in names and "tmp/counter" in names
        assert not any(n.startswith(("etc/hosts", "etc/resolv.conf", "etc/hostname", "proc/", "sys/")) for n in names)
        assert b"tick" in read_member(location, "container.log")

        info = json.loads(client.status(cid, verbose=True).info["info"])
        assert info["checkpointLocation"] == str(location) and info["checkpointedAt"]
    finally:
        cleanup(client, pod_id)


def test_memory_of_a_large_process_is_in_the_archive(client, pulled_busybox, archive_dir):
    # sort keeps all of its input in memory until EOF, which never comes while sleep runs.
    hold = "(head -c 268435456 /dev/zero | tr '\\000' a; sleep 100000) | sort"
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", hold])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rss = client.runtime.ContainerStats(cri.ContainerStatsRequest(container_id=cid)).stats.memory.rss_bytes.value
            if rss > 256 * 2**20:
                break
            time.sleep(0.5)
        location = archive_dir / "big.tar"
        checkpoint(client, cid, location)
        with tarfile.open(location) as tar:
            pages = sum(m.size for m in tar.getmembers() if m.name.startswith("checkpoint/pages-"))
        assert pages >= 256 * 2**20, f"only {pages} bytes of memory pages in the archive"
    finally:
        cleanup(client, pod_id)


def test_established_tcp_connections_are_checkpointed(client, pulled_busybox, archive_dir):
    script = "nc -l -p 9000 -e cat & sleep 0.5; (while true; do echo hi; sleep 0.2; done) | nc 127.0.0.1 9000"
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", script])
    try:
        time.sleep(1.5)
        checkpoint(client, cid, archive_dir / "tcp.tar")
        assert client.status(cid).status.state == cri.CONTAINER_RUNNING
    finally:
        cleanup(client, pod_id)


def _error(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_bad_checkpoint_requests(client, pulled_busybox, archive_dir):
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sleep", "300"])
    done_pod, done_pod_id, done = run_container(client, pulled_busybox, ["true"])
    try:
        assert _error(lambda: checkpoint(client, "0" * 64, archive_dir / "x.tar"))[0] == grpc.StatusCode.NOT_FOUND
        for bad in ("", "relative.tar", str(archive_dir / "missing-dir" / "x.tar")):
            code, details = _error(lambda: checkpoint(client, cid, bad))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (bad, details)
        wait_for_state(client, done, cri.CONTAINER_EXITED)
        code, details = _error(lambda: checkpoint(client, done, archive_dir / "exited.tar"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "running" in details
        assert list(archive_dir.iterdir()) == []
        assert client.status(cid).status.state == cri.CONTAINER_RUNNING
    finally:
        cleanup(client, pod_id)
        cleanup(client, done_pod_id)


def test_inspect_checkpoint_shows_the_process_tree(client, pulled_busybox, archive_dir):
    from criu_glue.inspect import inspect_archive

    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", "sleep 1000"])
    try:
        time.sleep(0.5)
        location = archive_dir / "inspect.tar"
        checkpoint(client, cid, location)
        summary, report = inspect_archive(location)
        assert summary.engine.lower() == "pyshim"
        assert summary.container_name == "main" and summary.pod_name == pod.metadata.name
        assert "sh" in {p.command for p in report.processes} or "sleep" in {p.command for p in report.processes}
    finally:
        cleanup(client, pod_id)


# ---------------------------------------------------------------- faults, deadlines, concurrency, tools

@dataclass
class CheckpointDaemonSettings(DaemonSettings):
    """DaemonSettings plus a [checkpoint] table, for daemons whose checkpoint policy differs."""
    checkpoint_toml: str = ""

    def write_config(self) -> None:
        super().write_config()
        with open(self.config_file, "a") as f:
            f.write(f"\n[checkpoint]\n{self.checkpoint_toml}\n")


@pytest.fixture(scope="module")
def tcp_never_daemon(registry, busybox_ref):
    """A second daemon whose checkpoint.tcp_established is "never": CRIU must refuse live TCP."""
    base = new_settings("tn", "10.86.31.0/24")
    settings = CheckpointDaemonSettings(**vars(base), checkpoint_toml='tcp_established = "never"')
    d = Daemon(settings)
    d.start()
    try:
        with d.client() as c:
            c.pull(busybox_ref)
        yield d
        with d.client() as c:
            remove_everything(c)
    finally:
        d.stop()
        found = leftovers(settings)
        found += discard(settings)
    assert not found, f"the tcp_established=never daemon left these behind: {found}"


def assert_running_and_thawed(client, daemon, cid) -> None:
    """RUNNING for CRI, not paused for runc, and the counter still advancing."""
    assert client.status(cid).status.state == cri.CONTAINER_RUNNING
    state = subprocess.run(["runc", "--root", str(daemon.settings.state_dir / "runc"), "state", cid],
                           capture_output=True, text=True, check=True)
    assert json.loads(state.stdout)["status"] == "running", "container left frozen (runc state)"
    before = counter_value(client, cid)
    deadline = time.monotonic() + 10
    while counter_value(client, cid) <= before:
        assert time.monotonic() < deadline, "container stopped making progress after the failed checkpoint"
        time.sleep(0.1)


def criu_lock_rules(daemon, pod_id: str) -> list[str]:
    """CRIU's network-lock rules (chain CRIU, both families) left in the pod's network namespace."""
    netns_path = Path("/run/netns") / f"{daemon.settings.netns_prefix}{pod_id[:16]}"
    found = []
    for tool in ("iptables", "ip6tables"):
        rules = subprocess.run(["nsenter", f"--net={netns_path}", "--", tool, "-w", "-S"],
                               capture_output=True, text=True, check=True).stdout
        found += [f"{tool} {r}" for r in rules.splitlines() if "CRIU" in r.split()]
    return found


def assert_nothing_left(archive_dir: Path, daemon) -> None:
    assert sorted(p.name for p in archive_dir.iterdir()) == [], "archive or temporary file left in the target dir"
    work = daemon.settings.root / "checkpoint-work"
    assert not work.exists() or list(work.iterdir()) == [], "CRIU work directory left behind"


def wait_for_rss(client, cid, size: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rss = client.runtime.ContainerStats(cri.ContainerStatsRequest(container_id=cid)).stats.memory.rss_bytes.value
        if rss >= size:
            return
        assert time.monotonic() < deadline, f"container holds only {rss} bytes, not {size}"
        time.sleep(0.3)


def checkpoint_call_outcomes(daemon, call: str = "checkpoint_container") -> list[str]:
    """The status code of each `call` (CheckpointContainer by default) the daemon has finished, from its log."""
    outcomes = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        if f'"call": "{call}"' in line and '"msg": "CRI call' in line:
            outcomes.append(json.loads(line).get("code", "OK"))
    return outcomes


def wait_for_checkpoint_call(daemon, done_before: int, timeout: float = 60, call: str = "checkpoint_container") -> str:
    """The daemon's own outcome of the next call: a gRPC client stops waiting at its deadline, the
    daemon finishes (and cleans up) after that."""
    deadline = time.monotonic() + timeout
    while len(outcomes := checkpoint_call_outcomes(daemon, call)) <= done_before:
        assert time.monotonic() < deadline, "the daemon never finished the checkpoint call"
        time.sleep(0.1)
    return outcomes[done_before]


TCP_PAIR = "nc -l -p 9000 -e cat & sleep 0.5; (while true; do echo hi; sleep 0.2; done) | nc 127.0.0.1 9000"


def test_criu_failure_reports_its_log_and_leaves_the_container_running(tcp_never_daemon, pulled_busybox, archive_dir):
    """CRIU refuses an established TCP connection without --tcp-established (policy "never")."""
    with tcp_never_daemon.client() as client:
        pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", f"{TCP_PAIR} & {COUNTER}"])
        try:
            deadline = time.monotonic() + 15
            while b" 01 " not in client.exec_sync(cid, ["cat", "/proc/net/tcp"]).stdout:
                assert time.monotonic() < deadline, "no established TCP connection in the container"
                time.sleep(0.2)
            code, details = _error(lambda: checkpoint(client, cid, archive_dir / "tcp.tar"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION, details
            assert "CRIU log" in details and "dump.log" in details, details
            # CRIU's own words, from its dump.log, not just runc's summary.
            assert "tcp-established" in details and "Error (criu/" in details, details
            assert_running_and_thawed(client, tcp_never_daemon, cid)
            assert_nothing_left(archive_dir, tcp_never_daemon)
            # The connection survived: the pair is still talking.
            assert b" 01 " in client.exec_sync(cid, ["cat", "/proc/net/tcp"]).stdout
        finally:
            cleanup(client, pod_id)


def test_deadline_exceeded_leaves_no_archive_and_a_thawed_container(client, daemon, pulled_busybox, archive_dir):
    hold = f"(head -c 536870912 /dev/zero | tr '\\000' a; sleep 100000) | sort & {COUNTER}"
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", hold])
    try:
        wait_for_rss(client, cid, 512 * 2**20)
        done = len(checkpoint_call_outcomes(daemon))
        # A gRPC deadline far shorter than a 512 MiB dump: runc and CRIU are stopped mid-dump.
        with pytest.raises(grpc.RpcError) as err:
            client.runtime.CheckpointContainer(cri.CheckpointContainerRequest(
                container_id=cid, location=str(archive_dir / "grpc-deadline.tar")), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The daemon too must see a deadline, not an error: a killed CRIU leaves the container thawed.
        assert wait_for_checkpoint_call(daemon, done) == "DEADLINE_EXCEEDED"
        assert_running_and_thawed(client, daemon, cid)
        assert_nothing_left(archive_dir, daemon)
        # CRIU locks the pod's whole network while it dumps; killed, it cannot lift the lock, and the
        # pod would drop every packet from then on.
        assert criu_lock_rules(daemon, pod_id) == []

        # The request's own timeout (1 s), with a generous gRPC deadline: the daemon itself must say
        # DEADLINE_EXCEEDED, and must not leave an archive finished after the deadline.
        code, details = _error(lambda: client.runtime.CheckpointContainer(cri.CheckpointContainerRequest(
            container_id=cid, location=str(archive_dir / "timeout.tar"), timeout=1), timeout=60))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
        assert cid in details, "the daemon's message, not the client's"
        assert_running_and_thawed(client, daemon, cid)
        assert_nothing_left(archive_dir, daemon)
        assert criu_lock_rules(daemon, pod_id) == []
        assert not json.loads(client.status(cid, verbose=True).info["info"]).get("checkpointLocation")
    finally:
        cleanup(client, pod_id)


def test_concurrent_checkpoints_of_one_container_all_complete(client, daemon, pulled_busybox, archive_dir):
    from criu_glue.archive import open_archive

    hold = f"(head -c 67108864 /dev/zero | tr '\\000' a; sleep 100000) | sort & {COUNTER}"
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", hold])
    try:
        wait_for_rss(client, cid, 64 * 2**20)
        # Two locations, and a third call racing the first for the same location.
        locations = [archive_dir / "one.tar", archive_dir / "two.tar", archive_dir / "one.tar"]
        start = threading.Barrier(len(locations))
        outcomes: list = [None] * len(locations)

        def run(i):
            start.wait()
            try:
                checkpoint(client, cid, locations[i])
                outcomes[i] = "ok"
            except grpc.RpcError as e:
                outcomes[i] = e.code()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(locations))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        # The second and third wait for the first (one checkpoint of a container at a time).
        assert outcomes == ["ok", "ok", "ok"], outcomes
        assert sorted(p.name for p in archive_dir.iterdir()) == ["one.tar", "two.tar"], "temporary files left"
        for location in set(locations):
            with open_archive(location) as archive:
                assert archive.config().id == cid
                assert archive.spec()["annotations"]["io.kubernetes.cri.container-name"] == "main"
                names = set(archive.member_names())
                assert {"checkpoint/inventory.img", "checkpoint/pstree.img", "rootfs-diff.tar"} <= names
                pages = sum(archive.member_size(n) for n in names if n.startswith("checkpoint/pages-"))
                assert pages >= 64 * 2**20, f"{location.name}: only {pages} bytes of pages"
            assert stat.S_IMODE(location.stat().st_mode) == 0o600
        work = daemon.settings.root / "checkpoint-work"
        assert list(work.iterdir()) == []
        assert_running_and_thawed(client, daemon, cid)
    finally:
        cleanup(client, pod_id)


def test_checkpointctl_shows_and_inspects_the_archive(client, pulled_busybox, archive_dir):
    checkpointctl = shutil.which("checkpointctl")
    if not checkpointctl:
        pytest.skip("checkpointctl is not installed (Debian trixie's checkpointctl package)")
    from criu_glue.archive import open_archive

    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", "echo data > /made-here; sleep 1000"])
    try:
        time.sleep(0.5)
        location = archive_dir / "checkpoint-ctl.tar"
        checkpoint(client, cid, location)

        def run(*args):
            proc = subprocess.run([checkpointctl, *args, str(location)], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, f"checkpointctl {' '.join(args)} failed: {proc.stderr}"
            return proc.stdout

        show = run("show")
        row = next(line for line in show.splitlines() if cid[:12] in line)
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert cells[0] == "main" and cells[1] == pulled_busybox and cells[3] == "runc", row
        assert cells[-2].endswith("KiB") and cells[-1].endswith("KiB"), f"checkpoint / rootfs diff sizes: {row}"

        tree = run("inspect")
        assert f"main\n├── Image: {pulled_busybox}\n├── ID: {cid}" in tree, tree
        assert "Checkpoint size:" in tree and "Root FS diff size:" in tree

        metadata = run("inspect", "--metadata", "--ps-tree")
        assert f"Pod name: {pod.metadata.name}" in metadata, metadata
        assert "Kubernetes namespace: default" in metadata, metadata
        assert "sleep" in metadata, "process tree names the container's process"

        [doc] = json.loads(run("inspect", "--stats", "--format", "json"))
        with open_archive(location) as archive:
            pages = sum(archive.member_size(n) for n in archive.member_names() if n.startswith("checkpoint/pages-"))
            assert doc["checkpoint_size"]["memory_pages_size"] == pages > 0
            assert doc["checkpoint_size"]["root_fs_diff_size"] == archive.rootfs_diff_size() > 0
        assert doc["container_name"] == "main" and doc["id"] == cid and doc["image"] == pulled_busybox
        assert doc["statistics"]["frozen_time"] > 0
    finally:
        cleanup(client, pod_id)


def _image_lower_dirs(rootfs: Path) -> list[Path]:
    """The container's image layers, bottom first, read independently of the checkpointer."""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(rootfs) and fields[2] == "overlay":
                options = dict(o.split("=", 1) for o in fields[3].split(",") if "=" in o)
                return [Path(p) for p in reversed(options["lowerdir"].split(":"))]
    raise AssertionError(f"{rootfs} is not an overlay mount")


def _tree(root: Path) -> dict[str, str]:
    """Path -> kind and content, the way a container would see a directory tree."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = "file " + path.read_bytes().decode(errors="replace")
    return found


def test_replaced_image_directory_is_described_exactly(client, daemon, pulled_busybox, archive_dir, tmp_path):
    """`rm -rf /usr; mkdir -p /usr/bin` makes /usr an opaque upper directory. With the image's layers
    the checkpoint records exactly the lower entries it hides, so deleting them and unpacking the diff
    onto the image gives the new /usr, in either order (CRI-O and Podman unpack first, then delete)."""
    from criu_glue.archive import open_archive
    from criu_glue.rootfs_diff import apply_rootfs_diff

    script = "rm -rf /usr && mkdir -p /usr/bin && echo x > /usr/bin/new && echo ok > /tmp/ready; sleep 1000"
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", script])
    try:
        deadline = time.monotonic() + 10
        while client.exec_sync(cid, ["cat", "/tmp/ready"]).stdout != b"ok\n":
            assert time.monotonic() < deadline, "the container did not replace /usr"
            time.sleep(0.1)
        location = archive_dir / "opaque.tar"
        checkpoint(client, cid, location)
        layers = _image_lower_dirs(daemon.settings.root / "containers" / cid / "rootfs")
        image = tmp_path / "image"
        image.mkdir()
        for layer in layers:  # the busybox test image's layers hold no whiteouts: plain copies stack
            subprocess.run(["cp", "-a", f"{layer}/.", str(image)], check=True)
        lower_usr = {n for n in _tree(image) if n.startswith("usr/")}
        assert "usr/bin/wget" in lower_usr and "usr/sbin" in lower_usr

        with open_archive(location) as archive:
            deleted = archive.deleted_files()
            archive.extract_member("rootfs-diff.tar", tmp_path / "diff.tar")
        # Exactly the hidden lower entries, never /usr itself (which would delete the new /usr too
        # for an engine that unpacks the diff first).
        hidden = {"/" + n for n in lower_usr if n.count("/") == 1 and n != "usr/bin"} | \
                 {"/" + n for n in lower_usr if n.startswith("usr/bin/")}
        assert "/usr" not in deleted and "/usr/bin" not in deleted
        assert {d for d in deleted if d.startswith("/usr")} == hidden
        with tarfile.open(tmp_path / "diff.tar") as tar:
            usr_members = {m.name for m in tar.getmembers() if m.name.startswith("usr")}
        assert usr_members == {"usr", "usr/bin", "usr/bin/new"}

        expected = {n: kind for n, kind in _tree(image).items() if not n.startswith("usr/")}
        expected |= {"usr/bin": "dir", "usr/bin/new": "file x\n"}

        delete_first = tmp_path / "delete-first"
        subprocess.run(["cp", "-a", str(image), str(delete_first)], check=True)
        apply_rootfs_diff(tmp_path / "diff.tar", deleted, delete_first)
        got = {n: kind for n, kind in _tree(delete_first).items() if not n.startswith(("tmp/", "root/"))}
        assert {n: k for n, k in got.items() if n.startswith("usr")} == {"usr": "dir", "usr/bin": "dir",
                                                                          "usr/bin/new": "file x\n"}
        assert got == {n: k for n, k in expected.items() if not n.startswith(("tmp/", "root/"))}

        unpack_first = tmp_path / "unpack-first"
        subprocess.run(["cp", "-a", str(image), str(unpack_first)], check=True)
        subprocess.run(["tar", "-xf", str(tmp_path / "diff.tar"), "-C", str(unpack_first)], check=True)
        for path in deleted:
            subprocess.run(["rm", "-rf", str(unpack_first / path.lstrip("/"))], check=True)
        assert _tree(unpack_first) == _tree(delete_first), "the archive means different things in CRI-O's order"
    finally:
        cleanup(client, pod_id)
