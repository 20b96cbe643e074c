"""A pyshim checkpoint archive restored by real Podman 5 (`podman container restore --import`), in
the private Podman installation of integration/podman.py. Skipped, with the reason, where Podman 5
is not installed.

The counter runs as kubelet runs a container of a pod without shareProcessNamespace (a PID
namespace of its own): a process that shared the pod's PID namespace is not PID 1 of any namespace
CRIU could re-create, so only a pod can take it back (see the README).
"""
from __future__ import annotations

import re
import time

import pytest

from integration import podman as pm
from integration.test_checkpoint import COUNTER, checkpoint, counter_value
from integration.test_lifecycle import cleanup, run_container
from integration.test_pod_checkpoint import new_pod, own_pid_namespace
from integration.test_podman_archives import busybox, podman  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

SCRIPT = f"echo added > /added-file; rm /etc/group; {COUNTER}"
_TICK = re.compile(r"^tick (\d+)$", re.M)


def _podman_counter(podman, cid: str) -> int:  # noqa: F811
    for _ in range(40):  # the loop truncates the file before writing it
        out = podman.podman("exec", cid, "cat", "/tmp/counter").stdout.strip()
        if out:
            return int(out)
        time.sleep(0.05)
    raise AssertionError(f"/tmp/counter stayed empty in {cid}")


def test_podman_restores_a_pyshim_checkpoint(client, pulled_busybox, podman, busybox, tmp_path):  # noqa: F811
    archive = tmp_path / "pyshim.tar"
    _, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", SCRIPT], pod=new_pod(),
                                   linux=own_pid_namespace())
    try:
        time.sleep(1)
        at_checkpoint = counter_value(client, cid)
        checkpoint(client, cid, archive)
    finally:
        cleanup(client, pod_id)  # the pod, its network namespace and files are gone before Podman starts

    podman.pull(busybox)  # the base image config.dump names (rootfsImageName + rootfsImageID)
    restored = podman.restore_import(archive)
    try:
        assert restored == cid  # Podman keeps the archive's container ID
        assert podman.state(restored) == "running"
        # The process goes on from where it was: its first line after the restore carries on the
        # count (a restart would log "tick 0"), and it keeps counting.
        first = _podman_counter(podman, restored)
        assert first >= at_checkpoint
        ticks = [int(t) for t in _TICK.findall(podman.logs(restored))]
        assert ticks and ticks[0] >= at_checkpoint, ticks[:5]
        time.sleep(0.5)
        assert _podman_counter(podman, restored) > first
        # The rootfs diff and deleted.files were applied by Podman.
        assert podman.podman("exec", restored, "cat", "/added-file").stdout == "added\n"
        assert podman.podman("exec", restored, "test", "-e", "/etc/group", check=False).returncode == 1
        # Podman's own hosts, hostname and resolv.conf where pyshim's pod had its own (the old
        # pod's files are gone; spec.dump no longer names them).
        mountinfo = podman.podman("exec", restored, "cat", "/proc/self/mountinfo").stdout
        by_point = {line.split()[4]: line.split()[3] for line in mountinfo.splitlines()}
        for path in ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf"):
            assert str(podman.base.name) in by_point[path], (path, by_point[path])
    finally:
        podman.remove_all()
    assert podman.leftovers() == []
