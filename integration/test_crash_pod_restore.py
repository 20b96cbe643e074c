"""Fault injection for RestorePod: the daemon SIGKILLs itself inside the call (PYSHIM_CRASH_AT, see
pyshim/internal/crashpoints.py and pyshim/checkpoint_restore/pod_restore_journal.py), is started
again, and then

- the sandbox and the containers the call made are gone: ListPodSandbox and ListContainers show none
  of them, even when the call had made everything and only its answer was missing (the kubelet saw
  an error and retries with a new call);
- nothing on the machine is left: netns, IP allocation, CNI cache, mounts, cgroups, pod and container
  dirs, runc containers, conmon processes;
- the pod checkpoint is exactly as it was (RestorePod only reads it);
- the kubelet's retry, the same request again, succeeds.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as cri
from integration.conftest import discard, new_settings
from integration.daemon import (Daemon, container_dirs_without_record, leftovers, remove_everything,
                                unowned_container_cgroups)
from integration.test_crash_sandboxes import recovery_lines
from integration.test_lifecycle import cleanup
from integration.test_pod_checkpoint import checkpoint_pod, echoes, new_pod, pod_containers, restore_pod, run_pod, wait_for
from pyshim.checkpoint_restore import pod_restore_journal

pytestmark = pytest.mark.integration

SUBNET = "10.87.3.0/24"  # this module's own: concurrent crash suites must not share addresses

CRASH_POINTS = [
    "restore_pod:begin",  # every id is journaled, nothing made yet
    "run_sandbox:cni_add",  # inside the sandbox's creation (RunPodSandbox's own intent undoes it)
    "run_sandbox:saved",  # RunPodSandbox saved the pod but had not closed its own intent
    pod_restore_journal.CRASH_SANDBOX_CREATED,
    pod_restore_journal.CRASH_CONTAINER_CREATED,  # the first container exists, the second is only named
    pod_restore_journal.CRASH_CREATED,  # everything made (the last container too), the answer not sent
]


@pytest.fixture(scope="module")
def node(registry, busybox_ref, tmp_path_factory):
    """A daemon with the busybox image and a pod checkpoint of two containers that talk over the pod's
    loopback (so that RestorePod also holds those connections in the new pod's netns)."""
    settings = new_settings("crashpr", SUBNET)
    daemon = Daemon(settings)
    checkpoint = tmp_path_factory.mktemp("pod-restore-crash") / "checkpoint"
    checkpoint.mkdir(mode=0o700)
    shared = checkpoint.parent / "shared"
    shared.mkdir()
    configs = pod_containers(busybox_ref, shared)
    try:
        daemon.start()
        with daemon.client() as c:
            c.pull(busybox_ref)
            _, pod_id, ids = run_pod(c, configs)
            try:
                wait_for(lambda: echoes(c, ids[1]) > 0, "the client never got an echo over loopback")
                checkpoint_pod(c, pod_id, ids, checkpoint)
            finally:
                cleanup(c, pod_id)
        yield daemon, checkpoint, configs
    finally:
        daemon.stop()
        found = leftovers(settings)
        remaining_cgroups = discard(settings)
        assert not found and not remaining_cgroups, f"left behind: {found} {remaining_cgroups}"


def tree_digest(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: kind, mode, size, mtime and content hash (what 'unchanged' means)."""
    found = {}
    for path in sorted(root.rglob("*")) + [root]:
        st = os.lstat(path)
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
        found[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, content)
    return found


def recovery_warnings(daemon: Daemon) -> list[str]:
    return [doc["msg"] for doc in recovery_lines(daemon) if doc["msg"].startswith("recovery: RestorePod")]


def nothing_left(daemon: Daemon, client) -> None:
    assert list(client.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items) == []
    assert list(client.runtime.ListContainers(cri.ListContainersRequest()).containers) == []
    found = (leftovers(daemon.settings) + container_dirs_without_record(daemon.settings, set())
             + unowned_container_cgroups(daemon.settings, set()))
    assert not found, found


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_restore_pod_killed_leaves_nothing_and_the_retry_restores(node, point):
    daemon, checkpoint, configs = node
    before = tree_digest(checkpoint)
    pod = new_pod()
    warnings_before = len(recovery_warnings(daemon))
    daemon.stop()
    daemon.start(crash_at=point)
    with daemon.client() as c:
        with pytest.raises(grpc.RpcError) as killed:
            restore_pod(c, checkpoint, pod, configs)
        assert killed.value.code() == grpc.StatusCode.UNAVAILABLE, killed.value
    daemon.wait_crashed()
    daemon.start()  # recovery runs before it serves
    try:
        with daemon.client() as c:
            nothing_left(daemon, c)
            assert tree_digest(checkpoint) == before, "RestorePod's recovery changed the checkpoint"
            assert len(recovery_warnings(daemon)) > warnings_before, "the repair is logged at warning level"
            # The kubelet's retry: the same request (same pod name and uid) succeeds, once.
            response = restore_pod(c, checkpoint, pod, configs)
            pods = list(c.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items)
            assert [p.id for p in pods] == [response.pod_sandbox_id]
            listed = {x.id: x.state for x in c.runtime.ListContainers(cri.ListContainersRequest()).containers}
            assert listed == {r.container_id: cri.CONTAINER_CREATED for r in response.restored_containers}
            remove_everything(c)
            nothing_left(daemon, c)
        assert tree_digest(checkpoint) == before
        assert not (daemon.settings.root / "state" / "intents").exists() or \
            list((daemon.settings.root / "state" / "intents").iterdir()) == [], "an intent stayed open"
    finally:
        if daemon.process is None or daemon.process.poll() is not None:
            daemon.start()
        with daemon.client() as c:
            remove_everything(c)
