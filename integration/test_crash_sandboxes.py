"""Fault injection for pod sandboxes and image pulls: the daemon SIGKILLs itself at each step of
RunPodSandbox, StopPodSandbox, RemovePodSandbox and PullImage (PYSHIM_CRASH_AT, see
pyshim/internal/crashpoints.py), is started again, and then

- its answers are truthful (ListPodSandbox / PodSandboxStatus / ListImages),
- a retried call succeeds,
- the pod or image exists exactly once, or not at all,
- nothing on the machine is owned by no record: netns, IP allocations, CNI cache entries, pod dirs,
  pinned namespaces, pid infra processes, cgroups, runc containers, partial blobs.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as cri
from integration.conftest import container_config, discard, new_settings, pod_config
from integration.daemon import (Daemon, image_store_leftovers, ip_allocations, leftovers, remove_everything,
                                sandbox_leftovers)
from pyshim.internal.image_pulls import PULL_STEPS
from pyshim.internal.sandbox_manager import RUN_STEPS

# crash-pod's own subnet (crash-common.md): concurrent crash suites must not share addresses.
SUBNET = "10.87.2.0/24"
STOP_STEPS = ("begin", "network", "namespaces")
REMOVE_STEPS = ("begin", "network", "namespaces", "containers", "cgroup", "files", "forget")


@pytest.fixture(scope="module")
def crash_settings(registry):
    settings = new_settings("cp", SUBNET)
    yield settings
    found = leftovers(settings)
    found += discard(settings)
    assert not found, f"left behind: {found}"


@pytest.fixture
def crash_daemon(crash_settings):
    """A daemon of the module's settings, started by the test (with or without a crash point). After
    the test every pod is removed and nothing may be left on the machine."""
    d = Daemon(crash_settings)
    yield d
    if d.process is None or d.process.poll() is not None:
        d.start()
    with d.client() as c:
        remove_everything(c)
    d.stop()
    assert not leftovers(crash_settings), f"leaked: {leftovers(crash_settings)}"


def full_pod_config(name: str = None) -> "cri.PodSandboxConfig":
    """A pod that makes every piece RunPodSandbox can make: netns + CNI (with a host port, so
    portmap rules too), pinned IPC/UTS namespaces and a pid infra process."""
    config = pod_config(name)
    config.port_mappings.add(protocol=cri.Protocol.TCP, container_port=80, host_port=0)
    config.port_mappings.add(protocol=cri.Protocol.TCP, container_port=8080, host_port=18781)
    config.linux.security_context.namespace_options.pid = cri.NamespaceMode.POD
    return config


def expect_killed(call) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, failure.value


def pods(client) -> list:
    return list(client.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items)


def assert_nothing_unowned(daemon: Daemon, client) -> None:
    known = {p.id for p in pods(client)}
    assert not sandbox_leftovers(daemon.settings, known), sandbox_leftovers(daemon.settings, known)


def recovery_lines(daemon: Daemon) -> list[dict]:
    lines = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if str(doc.get("msg", "")).startswith("recovery:"):
            lines.append(doc)
    return lines


# ---------------------------------------------------------------- RunPodSandbox

@pytest.mark.parametrize("step", [*RUN_STEPS, "saved"])
def test_run_pod_sandbox_killed_at_each_step(crash_daemon, step):
    config = full_pod_config()
    crash_daemon.start(crash_at=f"run_sandbox:{step}")
    with crash_daemon.client() as c:
        expect_killed(lambda: c.run_pod(config))
    crash_daemon.wait_crashed()
    crash_daemon.start()
    with crash_daemon.client() as c:
        found = pods(c)
        assert_nothing_unowned(crash_daemon, c)
        if step == "saved":
            # Saved before the kill: the pod exists once, ready, with its network; kubelet finds it by name.
            [pod] = found
            assert pod.metadata.name == config.metadata.name and pod.state == cri.SANDBOX_READY
            assert c.pod_status(pod.id).status.network.ip.startswith("10.87.2.")
            assert len(ip_allocations(crash_daemon.settings)) == 1
            c.stop_pod(pod.id)
            c.remove_pod(pod.id)
            assert pods(c) == []
        else:
            assert found == [], "a RunPodSandbox that never finished must leave no pod"
            assert ip_allocations(crash_daemon.settings) == []
            pod_id = c.run_pod(config)  # the retry: the name is free again
            assert [(p.id, p.state) for p in pods(c)] == [(pod_id, cri.SANDBOX_READY)]
            assert len(ip_allocations(crash_daemon.settings, {pod_id})) == 0
            assert len(ip_allocations(crash_daemon.settings)) == 1
            assert_nothing_unowned(crash_daemon, c)
    if step not in ("begin",):
        assert recovery_lines(crash_daemon), "each repair is logged at warning level"


def test_repeated_crashes_after_cni_add_never_exhaust_addresses(crash_daemon):
    """Each crash after CNI ADD held an address; each recovery must give it back."""
    for _ in range(5):
        crash_daemon.start(crash_at="run_sandbox:pod_files")
        with crash_daemon.client() as c:
            expect_killed(lambda: c.run_pod(full_pod_config()))
        crash_daemon.wait_crashed()
        crash_daemon.start()
        with crash_daemon.client() as c:
            assert pods(c) == []
        assert ip_allocations(crash_daemon.settings) == []
        crash_daemon.stop()
    crash_daemon.start()
    with crash_daemon.client() as c:
        pod_id = c.run_pod(full_pod_config())
        assert len(ip_allocations(crash_daemon.settings)) == 1
        assert_nothing_unowned(crash_daemon, c)
        c.stop_pod(pod_id)
        c.remove_pod(pod_id)


def test_a_crash_during_recovery_is_repaired_by_the_next_recovery(crash_daemon):
    """Recovery finishes an interrupted StopPodSandbox with the same steps; killed there too (before
    it serves), the next start still finishes it."""
    crash_daemon.start(crash_at="stop_sandbox:network")
    with crash_daemon.client() as c:
        pod_id = c.run_pod(full_pod_config())
        expect_killed(lambda: c.stop_pod(pod_id))
    crash_daemon.wait_crashed()
    with pytest.raises(RuntimeError, match="exited with -9"):
        crash_daemon.start(crash_at="stop_sandbox:network")  # killed by its own recovery
    crash_daemon.start()
    with crash_daemon.client() as c:
        assert [(p.id, p.state) for p in pods(c)] == [(pod_id, cri.SANDBOX_NOTREADY)]
        assert ip_allocations(crash_daemon.settings) == []
        assert_nothing_unowned(crash_daemon, c)


# ---------------------------------------------------------------- StopPodSandbox

@pytest.mark.parametrize("step", STOP_STEPS)
def test_stop_pod_sandbox_killed_at_each_step(crash_daemon, step):
    config = full_pod_config()
    crash_daemon.start(crash_at=f"stop_sandbox:{step}")
    with crash_daemon.client() as c:
        pod_id = c.run_pod(config)
        expect_killed(lambda: c.stop_pod(pod_id))
    crash_daemon.wait_crashed()
    crash_daemon.start()
    with crash_daemon.client() as c:
        # The stop is finished by recovery: the pod is there once, NOTREADY, its network released.
        [pod] = pods(c)
        assert (pod.id, pod.state) == (pod_id, cri.SANDBOX_NOTREADY)
        assert ip_allocations(crash_daemon.settings) == []
        assert not Path(f"/run/netns/{crash_daemon.settings.netns_prefix}{pod_id[:16]}").exists()
        c.stop_pod(pod_id)  # the retry succeeds
        assert c.pod_status(pod_id).status.state == cri.SANDBOX_NOTREADY
        c.remove_pod(pod_id)
        assert pods(c) == []
        assert_nothing_unowned(crash_daemon, c)


# ---------------------------------------------------------------- RemovePodSandbox

@pytest.mark.parametrize("step", REMOVE_STEPS)
def test_remove_pod_sandbox_killed_at_each_step(crash_daemon, step):
    config = full_pod_config()
    crash_daemon.start(crash_at=f"remove_sandbox:{step}")
    with crash_daemon.client() as c:
        pod_id = c.run_pod(config)
        c.stop_pod(pod_id)
        expect_killed(lambda: c.remove_pod(pod_id))
    crash_daemon.wait_crashed()
    crash_daemon.start()
    with crash_daemon.client() as c:
        # The removal was asked for and nothing stands in its way: recovery finishes it.
        assert pods(c) == []
        c.remove_pod(pod_id)  # the retry succeeds (removing a removed pod is no error)
        assert_nothing_unowned(crash_daemon, c)


def test_remove_pod_sandbox_deletes_runc_containers_that_no_record_names(crash_daemon, busybox_ref):
    """A runc container of the pod whose record is lost (what a crash in CreateContainer leaves) must
    not survive RemovePodSandbox, nor its processes stay in the pod's cgroup."""
    config = full_pod_config()
    crash_daemon.start()
    with crash_daemon.client() as c:
        c.pull(busybox_ref)
        pod_id = c.run_pod(config)
        ctr = c.create(pod_id, container_config(busybox_ref, ["sleep", "600"]), config)
        c.start(ctr)
    crash_daemon.stop()
    (crash_daemon.settings.root / "state" / "containers" / f"{ctr}.json").unlink()
    crash_daemon.start()
    with crash_daemon.client() as c:
        assert c.runtime.ListContainers(cri.ListContainersRequest()).containers == []
        c.stop_pod(pod_id)
        c.remove_pod(pod_id)
        assert pods(c) == []
    found = leftovers(crash_daemon.settings)
    assert not [f for f in found if f.startswith(("runc container", "cgroup", "conmon"))], found
    # Its rootfs mount is the container recovery's to find (crash-ctr); here it is unmounted by hand.
    rootfs_mounts = [f.split(" ", 1)[1] for f in found if f.startswith("mount ")]
    for mountpoint in rootfs_mounts:
        subprocess.run(["umount", "-l", mountpoint], check=True)


# ---------------------------------------------------------------- PullImage

def images(client) -> list:
    return list(client.images.ListImages(cri.ListImagesRequest()).images)


@pytest.mark.parametrize("step", [*PULL_STEPS, "recorded"])
def test_pull_image_killed_at_each_step(crash_daemon, busybox_ref, step):
    crash_daemon.start(crash_at=f"pull_image:{step}")
    with crash_daemon.client() as c:
        for image in images(c):  # start from an empty store: every blob is the pull's to add
            c.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image.id)))
        expect_killed(lambda: c.pull(busybox_ref))
    crash_daemon.wait_crashed()
    crash_daemon.start()
    with crash_daemon.client() as c:
        # Partial downloads are gone, and so are whole blobs of an image never recorded.
        assert not image_store_leftovers(crash_daemon.settings), image_store_leftovers(crash_daemon.settings)
        found = [tag for image in images(c) for tag in image.repo_tags]
        assert found == ([busybox_ref] if step == "recorded" else [])
        image_id = c.pull(busybox_ref)  # the retry succeeds and the image is there once
        [image] = images(c)
        assert image.id == image_id and list(image.repo_tags) == [busybox_ref]
        assert not image_store_leftovers(crash_daemon.settings)
        # The pulled image is whole: a container runs from it.
        config = pod_config()
        pod_id = c.run_pod(config)
        ctr = c.create(pod_id, container_config(busybox_ref, ["true"]), config)
        c.start(ctr)
