"""Faults that are not crashes: what a user sees when a plugin, a probe or a request goes wrong."""
from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as cri
from integration.conftest import container_config, pod_config
from integration.test_lifecycle import cleanup, run_container
from pyshim.annotations import POD_IP_ANNOTATION
from pyshim.internal import cgroups


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _network_records(daemon) -> list[str]:
    """What host-local (allocated addresses) and pyshim's CNI cache hold for the daemon's network."""
    cni = Path(daemon.settings.root) / "cni"
    # host-local keeps a "lock" file and a "last_reserved_ip" cursor: neither holds an address.
    return sorted(str(p.relative_to(cni)) for p in cni.rglob("*")
                  if p.is_file() and p.name != "lock" and not p.name.startswith("last_reserved_ip"))


def test_a_cni_plugin_failure_reaches_the_client_with_its_message_and_leaves_nothing(client, daemon):
    running = client.run_pod(pod_config())
    try:
        before = _network_records(daemon)
        pod = pod_config(annotations={POD_IP_ANNOTATION: "192.0.2.7"})  # outside the daemon's 10.86.0.0/24
        error = _error(lambda: client.run_pod(pod))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert "failed to allocate" in error.details() and "192.0.2.7" in error.details(), error.details()
        assert "CNI plugin" in error.details()
        assert [p.id for p in client.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items] == [running]
        assert _network_records(daemon) == before
        # The network still serves the next pod.
        cleanup(client, client.run_pod(pod_config()))
    finally:
        cleanup(client, running)


def _container_processes(client, cid) -> list[str]:
    out = client.exec_sync(cid, ["ps", "-o", "pid,args"]).stdout.decode()
    return [line.split(None, 1)[1] for line in out.splitlines()[1:] if len(line.split(None, 1)) == 2]


def test_exec_sync_timeout_kills_what_it_ran_and_only_that(client, pulled_busybox):
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", "sleep 3600 & while true; do sleep 1; done"])
    try:
        error = _error(lambda: client.exec_sync(cid, ["sh", "-c", "sleep 600 & sleep 601"], timeout=1))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
        processes = _container_processes(client, cid)
        assert not [p for p in processes if p.startswith(("sleep 60", "sh -c sleep 600"))], processes
        assert "sleep 3600" in processes, processes  # the container's own processes live on
        assert client.status(cid).status.state == cri.CONTAINER_RUNNING
    finally:
        cleanup(client, pod_id)


def test_a_process_the_kernel_cannot_exec_is_refused_at_create_and_leaves_nothing(client, pulled_busybox):
    pod = pod_config()
    pod_id = client.run_pod(pod)
    try:
        huge_env = [cri.KeyValue(key=f"V{i}", value="x") for i in range(300_000)]
        for config in (container_config(pulled_busybox, ["true"], envs=huge_env),
                       container_config(pulled_busybox, ["echo", "x" * 200_000]),
                       container_config(pulled_busybox, ["true"], envs=[cri.KeyValue(key=f"V{i}", value="y" * 100_000)
                                                                      for i in range(40)])):
            error = _error(lambda: client.create(pod_id, config, pod))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert "limit" in error.details() or "MAX_ARG_STRLEN" in error.details() or "ARG_MAX" in error.details()
        assert not list(client.runtime.ListContainers(cri.ListContainersRequest()).containers)
        # The name was not taken by the refused requests.
        cid = client.create(pod_id, container_config(pulled_busybox, ["true"]), pod)
        client.remove(cid)
    finally:
        cleanup(client, pod_id)


@pytest.mark.parametrize("log_path", ["../../escape.log", "/tmp/pyshim-escape.log", "main/../../x.log"])
def test_log_paths_outside_the_pods_log_directory_are_refused(client, pulled_busybox, tmp_path, log_path):
    pod = pod_config(log_directory=str(tmp_path / "logs" / "pod"))
    pod_id = client.run_pod(pod)
    try:
        error = _error(lambda: client.create(pod_id, container_config(pulled_busybox, ["true"], log_path=log_path),
                                             pod))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "log_path" in error.details()
        assert not (tmp_path / "logs" / "escape.log").exists() and not (tmp_path / "x.log").exists()
        assert not Path("/tmp/pyshim-escape.log").exists()
    finally:
        cleanup(client, pod_id)


def test_relative_log_directory_and_cgroup_parent_with_dotdot_are_refused(client, daemon):
    for pod, words in ((pod_config(log_directory="relative/logs"), "log_directory"),
                       (pod_config(linux=cri.LinuxPodSandboxConfig(cgroup_parent="/kubepods/../../escape")),
                        "cgroup_parent")):
        error = _error(lambda: client.run_pod(pod))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert words in error.details()
    assert not list(client.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items)


def test_kubelets_cgroupfs_parent_is_accepted(client, daemon, pulled_busybox):
    parent = f"{daemon.settings.cgroup_parent}/kubepods/burstable/pod{os.urandom(4).hex()}"
    pod = pod_config(linux=cri.LinuxPodSandboxConfig(cgroup_parent=parent))
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sleep", "600"], pod=pod)
    try:
        assert Path(f"/sys/fs/cgroup/memory{parent}/{cid}").is_dir()
    finally:
        cleanup(client, pod_id)
        # /kubepods/burstable is kubelet's, not the pod's: the runtime removes only the pod's cgroup.
        cgroups.remove(f"{daemon.settings.cgroup_parent}/kubepods")


def test_conmon_writes_nothing_in_the_daemons_working_directory(client, daemon, pulled_busybox):
    daemon_cwd = Path(os.readlink(f"/proc/{daemon.process.pid}/cwd"))
    before = set(os.listdir(daemon_cwd))
    resources = cri.LinuxContainerResources(memory_limit_in_bytes=16 * 1024 * 1024)
    pod, pod_id, cid = run_container(
        client, pulled_busybox, ["sh", "-c", "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo ${#x}"],
        linux=cri.LinuxContainerConfig(resources=resources))
    try:
        deadline = time.monotonic() + 60
        while (status := client.status(cid).status).state != cri.CONTAINER_EXITED:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert status.reason == "OOMKilled", (status.reason, status.exit_code)
        assert set(os.listdir(daemon_cwd)) - before == set()
    finally:
        cleanup(client, pod_id)


# Long sleeps, a blocking read on a fifo, children waiting in `wait`, a reader blocked on a pipe.
MANY_WAITS = ("mkfifo /tmp/f /tmp/g; sleep 3600 & sleep 3601.5 & cat /tmp/f & "
              "(sh -c 'sleep 3602 & wait; echo wait-ended') & exec 3<>/tmp/g; (read x < /tmp/g) & "
              "while true; do sleep 1; done")


def _long_lived(client, cid) -> set[tuple[str, str]]:
    """(pid, cmdline) of the container's processes, minus the ones the loop and ps replace."""
    out = client.exec_sync(cid, ["ps", "-o", "pid,args"]).stdout.decode()
    rows = {tuple(line.split(None, 1)) for line in out.splitlines()[1:] if len(line.split(None, 1)) == 2}
    return {(pid, args) for pid, args in rows if args not in ("sleep 1", "ps -o pid,args")}


def test_a_leave_running_checkpoint_leaves_every_process_as_it_was(client, pulled_busybox, tmp_path):
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", MANY_WAITS],
                                     pod=pod_config(log_directory=str(tmp_path / "logs")))
    try:
        deadline = time.monotonic() + 30
        while len(before := _long_lived(client, cid)) < 7:
            assert time.monotonic() < deadline, before
            time.sleep(0.1)
        client.runtime.CheckpointContainer(cri.CheckpointContainerRequest(
            container_id=cid, location=str(tmp_path / "ck.tar"), timeout=60), timeout=70)
        assert _long_lived(client, cid) == before
    finally:
        cleanup(client, pod_id)


@pytest.mark.xfail(strict=True, reason=(
    "CRIU limitation, not pyshim's freeze/thaw (bare `runc checkpoint --leave-running` does the same): "
    "a task seized in a syscall that restarts through restart_syscall (nanosleep, clock_nanosleep, poll "
    "or futex with a timeout) loses its restart block when CRIU's parasite returns with rt_sigreturn "
    "(dump.log: 'Will restore PID with interrupted system call'), so after the dump the syscall fails "
    "with EINTR; a program that does not retry, like busybox usleep, ends."))
def test_a_sleep_that_does_not_retry_on_eintr_survives_a_checkpoint(client, pulled_busybox, tmp_path):
    pod, pod_id, cid = run_container(client, pulled_busybox,
                                     ["sh", "-c", "usleep 3600000000 & while true; do sleep 1; done"],
                                     pod=pod_config(log_directory=str(tmp_path / "logs")))
    try:
        deadline = time.monotonic() + 30
        before = _long_lived(client, cid)
        while not any("usleep" in args for _, args in before):
            assert time.monotonic() < deadline, before
            time.sleep(0.1)
            before = _long_lived(client, cid)
        client.runtime.CheckpointContainer(cri.CheckpointContainerRequest(
            container_id=cid, location=str(tmp_path / "ck.tar"), timeout=60), timeout=70)
        assert _long_lived(client, cid) == before
    finally:
        cleanup(client, pod_id)
