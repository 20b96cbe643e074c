"""File locks across checkpoint/restore: flock, POSIX and OFD locks on files in the container's own
writable layer are held by the restored process in a new pod (CRIU --file-locks at dump and restore).

The test image's /usr/bin/locker (integration/tools/locker.c) holds the three kinds and probes them.
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as cri
from integration.conftest import container_config, pod_config
from integration.test_checkpoint import checkpoint
from integration.test_lifecycle import cleanup, run_container
from integration.test_restore import log_texts, restore_into_new_pod

# Created at run time: the files live in the container's writable layer (overlay upper), not the image.
FILES = {"flock": "/data/flock.lock", "posix": "/data/posix.lock", "ofd": "/data/ofd.lock"}
UNLOCKED = "/data/nobody.lock"
HOLD = f"mkdir -p /data && exec locker hold {FILES['flock']} {FILES['posix']} {FILES['ofd']}"
# How /proc/locks names each kind.
PROC_LOCKS_KIND = {"flock": "FLOCK", "posix": "POSIX", "ofd": "OFDLCK"}


@pytest.fixture
def archive_dir(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir(mode=0o700)
    return d


def probe(client, cid, kind: str, path: str) -> str:
    """`locker probe` in the container: "free", "held", or the error it reported."""
    r = client.exec_sync(cid, ["locker", "probe", kind, path], timeout=10)
    out = r.stdout.decode().strip()
    if r.exit_code in (0, 1) and out in ("free", "held"):
        return out
    return f"error (exit {r.exit_code}): {out} {r.stderr.decode().strip()}"


def probes(client, cid, path_of=FILES) -> dict[str, str]:
    return {kind: probe(client, cid, kind, path_of[kind] if isinstance(path_of, dict) else path_of)
            for kind in ("flock", "posix", "ofd")}


def wait_locked(client, cid, timeout: float = 10) -> int:
    """The container-side pid locker printed once it held all three locks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for text in log_texts(client, cid):
            if text.startswith("locked "):
                return int(text.split()[1])
        time.sleep(0.05)
    raise AssertionError(f"locker never reported its locks; log: {log_texts(client, cid)}")


def host_pid(client, cid) -> int:
    return json.loads(client.status(cid, verbose=True).info["info"])["pid"]


def proc_locks_of(pid: int) -> dict[str, list[str]]:
    """Locks in /proc/locks on the files locker holds in process `pid`'s root, by kind.

    FLOCK and POSIX entries name the holder's pid; OFD locks belong to an open file description and
    show pid -1, so every entry is matched by the locked file's inode (and FLOCK/POSIX by pid too)."""
    inodes = {kind: os.stat(f"/proc/{pid}/root{path}").st_ino for kind, path in FILES.items()}
    lines = Path("/proc/locks").read_text().splitlines()
    found: dict[str, list[str]] = {kind: [] for kind in FILES}
    for line in lines:
        fields = line.split()
        if fields[1] == "->":  # a waiter, not a holder
            continue
        lock_kind, lock_pid, ino = fields[1], int(fields[4]), int(fields[5].split(":")[2])
        for kind, want in PROC_LOCKS_KIND.items():
            if lock_kind == want and ino == inodes[kind] and (kind == "ofd" or lock_pid == pid):
                found[kind].append(line)
    return found


def test_flock_posix_and_ofd_locks_in_the_writable_layer_survive_restore(client, pulled_busybox, archive_dir):
    archive = archive_dir / "locker.tar"
    _, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", HOLD])
    try:
        wait_locked(client, cid)
        # The probes see what they should before any checkpoint: held where locker holds, free elsewhere.
        assert probes(client, cid) == {"flock": "held", "posix": "held", "ofd": "held"}
        assert probes(client, cid, UNLOCKED) == {"flock": "free", "posix": "free", "ofd": "free"}
        before = proc_locks_of(host_pid(client, cid))
        assert all(len(v) == 1 for v in before.values()), f"/proc/locks before checkpoint: {before}"
        checkpoint(client, cid, archive)
    finally:
        cleanup(client, pod_id)

    try:
        _, pod_id, cid = restore_into_new_pod(client, str(archive))
    except grpc.RpcError as err:
        # CRIU's restore.log lines are in the message: show them, do not hide which lock failed.
        pytest.fail(f"restore of the lock holder failed: {err.code()}: {err.details()}")
    try:
        assert client.status(cid).status.state == cri.CONTAINER_RUNNING
        pid = host_pid(client, cid)
        after = probes(client, cid)
        locks = proc_locks_of(pid)
        control = probes(client, cid, UNLOCKED)
        assert after == {"flock": "held", "posix": "held", "ofd": "held"}, \
            f"locks after restore (probe results): {after}; /proc/locks for pid {pid}: {locks}"
        for kind, want in PROC_LOCKS_KIND.items():
            assert len(locks[kind]) == 1 and f" {want} " in locks[kind][0], \
                f"/proc/locks has no single {want} lock of the restored process (pid {pid}) on " \
                f"{FILES[kind]}: {locks}"
        assert control == {"flock": "free", "posix": "free", "ofd": "free"}, control
        # Still the same process holding them: the log has one "locked" line, from before the checkpoint.
        assert sum(t.startswith("locked ") for t in log_texts(client, cid)) == 1
    finally:
        cleanup(client, pod_id)


def test_locks_survive_a_move_to_the_other_node_through_the_registry(two_nodes_clean, tmp_path):
    """Checkpoint on node A, checkpoint image pushed to the registry on the wire, pulled and restored on
    node B (each daemon in its own network namespace): the three locks are held there."""
    nodes = two_nodes_clean
    archive = tmp_path / "locker.tar"
    ref = f"{nodes.registry.address}/checkpoints/locker-{uuid.uuid4().hex[:8]}:v1"
    with nodes.a.client() as a:
        a.pull(nodes.busybox_ref)
        _, pod_id, cid = run_container(a, nodes.busybox_ref, ["sh", "-c", HOLD])
        try:
            wait_locked(a, cid)
            assert probes(a, cid) == {"flock": "held", "posix": "held", "ofd": "held"}
            checkpoint(a, cid, archive)
        finally:
            cleanup(a, pod_id)
    store = tmp_path / "build-store"
    for args in (("build", str(archive), "--tag", ref, "--root", str(store)),
                 ("push", ref, "--insecure", "--root", str(store))):
        done = subprocess.run([sys.executable, "-m", "pyshim", "checkpoint-image", *args],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr

    with nodes.b.client() as b:
        # Node B lacks the checkpoint image (and, unless another test pulled it, the base image, which
        # restore then pulls by the digest the checkpoint records).
        b.pull(ref)
        pod = pod_config()
        pod_id = b.run_pod(pod)
        try:
            try:
                cid = b.create(pod_id, container_config(ref, [], name="restored"), pod)
                b.start(cid)
            except grpc.RpcError as err:
                pytest.fail(f"restore on node B failed: {err.code()}: {err.details()}")
            assert b.status(cid).status.state == cri.CONTAINER_RUNNING
            ip = b.pod_status(pod_id).status.network.ip
            assert ipaddress.ip_address(ip) in ipaddress.ip_network(nodes.b.pod_subnet)
            after = probes(b, cid)
            locks = proc_locks_of(host_pid(b, cid))
            assert after == {"flock": "held", "posix": "held", "ofd": "held"}, \
                f"locks after the move (probe results): {after}; /proc/locks: {locks}"
            assert all(len(v) == 1 for v in locks.values()), locks
            assert probes(b, cid, UNLOCKED) == {"flock": "free", "posix": "free", "ofd": "free"}
        finally:
            cleanup(b, pod_id)
        b.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)), timeout=b.timeout)
