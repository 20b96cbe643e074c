"""CheckpointContainer end to end: real runc + CRIU, the archive other tools read, and bad input."""
from __future__ import annotations

import json
import os
import stat
import tarfile
import time
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as cri
from integration.test_lifecycle import cleanup, run_container, wait_for_state

COUNTER = "i=0; while true; do echo $i > /tmp/counter; echo tick $i; i=$((i+1)); sleep 0.1; done"


def checkpoint(client, cid, location, timeout=120):
    client.runtime.CheckpointContainer(cri.CheckpointContainerRequest(
        container_id=cid, location=str(location), timeout=timeout), timeout=timeout + 10)


def counter_value(client, cid) -> int:
    return int(client.exec_sync(cid, ["cat", "/tmp/counter"]).stdout)


def read_member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        return tar.extractfile(name).read()


@pytest.fixture
def archive_dir(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir(mode=0o700)
    return d


def test_checkpoint_writes_the_shared_archive_format_and_container_keeps_running(client, pulled_busybox, archive_dir):
    pod, pod_id, cid = run_container(client, pulled_busybox,
                                     ["sh", "-c", f"rm /etc/group; echo note > /root-note; {COUNTER}"])
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
