"""The daemon killed with SIGKILL and started again: every pod and container is still there, right."""
from __future__ import annotations

import time

import pytest

from cri_api import api_pb2 as cri
from integration.conftest import container_config, discard, new_settings, pod_config
from integration.daemon import Daemon, leftovers, remove_everything


@pytest.fixture
def own_daemon(registry, busybox_ref):
    settings = new_settings("rs", "10.86.1.0/24")
    d = Daemon(settings)
    d.start()
    with d.client() as c:
        c.pull(busybox_ref)
    yield d
    with d.client() as c:
        remove_everything(c)
    d.stop()
    found = leftovers(settings)
    found += discard(settings)
    assert not found, f"left behind: {found}"


def test_sigkill_and_restart_keeps_pods_containers_and_exit_codes(own_daemon, busybox_ref):
    pod = pod_config()
    with own_daemon.client() as c:
        pod_id = c.run_pod(pod)
        runner = c.create(pod_id, container_config(busybox_ref, ["sleep", "300"], name="runner"), pod)
        c.start(runner)
        # Exits with 42 while the daemon is down: the new daemon must report exactly that.
        quitter = c.create(pod_id, container_config(busybox_ref, ["sh", "-c", "sleep 2; exit 42"], name="quitter"), pod)
        c.start(quitter)
        created = c.create(pod_id, container_config(busybox_ref, ["true"], name="created"), pod)
        runner_pid_before = c.status(runner, verbose=True).info["info"]
        ip_before = c.pod_status(pod_id).status.network.ip

    own_daemon.kill()
    time.sleep(3)
    own_daemon.start()

    with own_daemon.client() as c:
        pods = c.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items
        assert [p.id for p in pods] == [pod_id] and pods[0].state == cri.SANDBOX_READY
        assert c.pod_status(pod_id).status.network.ip == ip_before
        states = {ctr.id: ctr.state for ctr in c.runtime.ListContainers(cri.ListContainersRequest()).containers}
        assert states == {runner: cri.CONTAINER_RUNNING, quitter: cri.CONTAINER_EXITED,
                          created: cri.CONTAINER_CREATED}
        assert c.status(quitter).status.exit_code == 42
        assert c.status(runner, verbose=True).info["info"] == runner_pid_before
        # The restarted daemon still drives the old containers.
        assert c.exec_sync(runner, ["echo", "alive"]).stdout == b"alive\n"
        c.start(created)
        c.stop(runner, timeout=1)
        assert c.status(runner).status.state == cri.CONTAINER_EXITED
