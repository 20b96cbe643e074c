"""Pods and containers driven over the CRI socket, as kubelet and crictl drive them."""
from __future__ import annotations

import ipaddress
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as cri
from integration.conftest import container_config, pod_config
from pyshim.internal.cri_log import read_log


def wait_for_state(client, container_id, state, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.status(container_id).status
        if status.state == state:
            return status
        time.sleep(0.05)
    raise AssertionError(f"container {container_id} not in state {state} after {timeout}s: {status}")


def run_container(client, image, command, pod=None, **kwargs):
    pod = pod or pod_config()
    pod_id = client.run_pod(pod)
    cid = client.create(pod_id, container_config(image, command, **kwargs), pod)
    client.start(cid)
    return pod, pod_id, cid


def cleanup(client, pod_id):
    client.stop_pod(pod_id)
    client.remove_pod(pod_id)


def test_version_and_status(client):
    v = client.version()
    assert v.runtime_name == "pyshim" and v.runtime_api_version == "v1"
    conditions = {c.type: c for c in client.runtime.Status(cri.StatusRequest()).status.conditions}
    assert conditions["RuntimeReady"].status
    assert conditions["NetworkReady"].status, conditions["NetworkReady"].message


def test_pod_gets_an_ip_in_the_daemon_subnet(client, daemon):
    pod = pod_config(hostname="web-1")
    pod_id = client.run_pod(pod)
    try:
        status = client.pod_status(pod_id).status
        assert status.state == cri.SANDBOX_READY
        assert ipaddress.ip_address(status.network.ip) in ipaddress.ip_network(daemon.settings.subnet)
        assert status.metadata.name == pod.metadata.name
        items = client.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items
        assert [p.id for p in items] == [pod_id]
    finally:
        cleanup(client, pod_id)


def test_container_runs_logs_and_reports_exit_code(client, pulled_busybox):
    pod, pod_id, cid = run_container(client, pulled_busybox,
                                     ["sh", "-c", "echo out-line; echo err-line >&2; hostname; exit 3"])
    try:
        status = wait_for_state(client, cid, cri.CONTAINER_EXITED)
        assert status.exit_code == 3
        assert status.reason == "Error"
        assert status.started_at > 0 and status.finished_at >= status.started_at
        entries = list(read_log(Path(status.log_path)))
        assert ("stdout", "out-line\n") in [(e.stream, e.text) for e in entries]
        assert ("stderr", "err-line\n") in [(e.stream, e.text) for e in entries]
        assert ("stdout", f"{pod.hostname}\n") in [(e.stream, e.text) for e in entries]
        assert status.log_path == str(Path(pod.log_directory) / "main/0.log")
    finally:
        cleanup(client, pod_id)


def test_pod_without_hostname_gets_the_node_hostname(client, pulled_busybox):
    # critest sends no hostname and a pod name longer than a hostname may be; containerd then uses
    # the node's hostname, and so does pyshim.
    pod = pod_config(name="p" * 80, hostname="")
    pod_id = client.run_pod(pod)
    try:
        cid = client.create(pod_id, container_config(pulled_busybox, ["sleep", "300"]), pod)
        client.start(cid)
        seen = client.exec_sync(cid, ["sh", "-c", "hostname; cat /etc/hostname; echo $HOSTNAME"]).stdout.decode()
        assert seen.split() == [socket.gethostname()] * 3
    finally:
        cleanup(client, pod_id)


def test_explicit_bad_hostname_is_invalid_argument_and_leaves_nothing(client):
    with pytest.raises(grpc.RpcError) as err:
        client.run_pod(pod_config(hostname="not a hostname"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hostname" in err.value.details()
    assert not client.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items


def test_exec_sync_and_stop_with_sigterm(client, pulled_busybox):
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done"])
    try:
        assert client.status(cid).status.state == cri.CONTAINER_RUNNING
        result = client.exec_sync(cid, ["sh", "-c", "echo from-exec; echo oops >&2; exit 7"])
        assert (result.stdout, result.stderr, result.exit_code) == (b"from-exec\n", b"oops\n", 7)
        client.stop(cid, timeout=10)
        status = client.status(cid).status
        assert status.state == cri.CONTAINER_EXITED and status.exit_code == 0
        client.stop(cid, timeout=10)  # stopping a stopped container succeeds
    finally:
        cleanup(client, pod_id)


def test_stop_kills_after_timeout_when_sigterm_is_ignored(client, pulled_busybox):
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"])
    try:
        started = time.monotonic()
        client.stop(cid, timeout=1)
        assert time.monotonic() - started >= 1
        status = client.status(cid).status
        assert status.state == cri.CONTAINER_EXITED and status.exit_code == 137
    finally:
        cleanup(client, pod_id)


def test_exec_sync_timeout_is_deadline_exceeded(client, pulled_busybox):
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sleep", "300"])
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.exec_sync(cid, ["sleep", "30"], timeout=1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        cleanup(client, pod_id)


def test_stop_and_remove_are_idempotent_and_unknown_ids_are_not_found(client, pulled_busybox):
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sleep", "300"])
    client.remove(cid)
    client.remove(cid)
    # The CRI makes stop and remove idempotent: kubelet retries them without knowing what happened.
    client.stop(cid, timeout=0)
    unknown = "0" * 64
    client.stop(unknown, timeout=0)
    client.remove(unknown)
    client.stop_pod(unknown)
    client.remove_pod(unknown)
    with pytest.raises(grpc.RpcError) as err:
        client.status(cid)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    cleanup(client, pod_id)
    cleanup(client, pod_id)  # stopping and removing a removed pod succeed
    with pytest.raises(grpc.RpcError) as err:
        client.pod_status(pod_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_bad_requests_get_clear_errors_and_leave_nothing(client, pulled_busybox):
    pod = pod_config()
    pod_id = client.run_pod(pod)
    try:
        code, details = _code_of(lambda: client.create(pod_id, container_config("127.0.0.1:1/none:latest", ["true"]), pod))
        assert code == grpc.StatusCode.NOT_FOUND and "127.0.0.1:1/none:latest" in details

        nameless = container_config(pulled_busybox, ["true"], name="")
        assert _code_of(lambda: client.create(pod_id, nameless, pod))[0] == grpc.StatusCode.INVALID_ARGUMENT

        relative = container_config(pulled_busybox, ["true"],
                                    mounts=[cri.Mount(container_path="data", host_path="/tmp")])
        assert _code_of(lambda: client.create(pod_id, relative, pod))[0] == grpc.StatusCode.INVALID_ARGUMENT

        good = container_config(pulled_busybox, ["sleep", "300"])
        cid = client.create(pod_id, good, pod)
        assert _code_of(lambda: client.create(pod_id, good, pod))[0] == grpc.StatusCode.ALREADY_EXISTS
        client.remove(cid)

        assert _code_of(lambda: client.start("0" * 64))[0] == grpc.StatusCode.NOT_FOUND
        assert _code_of(lambda: client.create("f" * 64, good, pod))[0] == grpc.StatusCode.NOT_FOUND
        assert _code_of(lambda: client.run_pod(pod))[0] == grpc.StatusCode.ALREADY_EXISTS
        bad_sysctl = pod_config(linux=cri.LinuxPodSandboxConfig(sysctls={"vm.swappiness": "10"}))
        assert _code_of(lambda: client.run_pod(bad_sysctl))[0] == grpc.StatusCode.INVALID_ARGUMENT
        nameless_pod = pod_config(name="")
        assert _code_of(lambda: client.run_pod(nameless_pod))[0] == grpc.StatusCode.INVALID_ARGUMENT
        containers = client.runtime.ListContainers(cri.ListContainersRequest()).containers
        assert containers == []
    finally:
        cleanup(client, pod_id)


def test_two_pods_reach_each_other(client, pulled_busybox):
    server_pod, server_pod_id, server = run_container(client, pulled_busybox,
                                                      ["sh", "-c", "while true; do echo pong | nc -l -p 8080; done"])
    client_pod = pod_config()
    client_pod_id = client.run_pod(client_pod)
    try:
        cid = client.create(client_pod_id, container_config(pulled_busybox, ["sleep", "300"]), client_pod)
        client.start(cid)
        ip = client.pod_status(server_pod_id).status.network.ip
        for _ in range(50):
            result = client.exec_sync(cid, ["sh", "-c", f"echo ping | nc -w 2 {ip} 8080"], timeout=10)
            if result.stdout == b"pong\n":
                break
            time.sleep(0.1)
        assert result.stdout == b"pong\n", result
    finally:
        cleanup(client, client_pod_id)
        cleanup(client, server_pod_id)


def test_list_filters(client, pulled_busybox):
    pod_a, pod_a_id, ca = run_container(client, pulled_busybox, ["sleep", "300"],
                                        labels={"app": "a"})
    pod_b, pod_b_id, cb = run_container(client, pulled_busybox, ["true"], labels={"app": "b"})
    try:
        wait_for_state(client, cb, cri.CONTAINER_EXITED)
        by_label = client.runtime.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(label_selector={"app": "a"}))).containers
        assert [c.id for c in by_label] == [ca]
        running = client.runtime.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(state=cri.ContainerStateValue(state=cri.CONTAINER_RUNNING)))).containers
        assert [c.id for c in running] == [ca]
        in_pod_b = client.runtime.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(pod_sandbox_id=pod_b_id))).containers
        assert [c.id for c in in_pod_b] == [cb]
        assert by_label[0].labels["app"] == "a"
    finally:
        cleanup(client, pod_a_id)
        cleanup(client, pod_b_id)


def test_guaranteed_pod_oom_score_adj_does_not_break_create(client, pulled_busybox):
    """kubelet sends oom_score_adj -997 for Guaranteed pods; on a host without CAP_SYS_RESOURCE the
    container must still run (at 0) instead of failing with runc's obscure pipe error."""
    from pyshim.internal.host_caps import can_lower_oom_score_adj

    resources = cri.LinuxContainerResources(oom_score_adj=-997)
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sleep", "300"],
                                     linux=cri.LinuxContainerConfig(resources=resources))
    try:
        assert client.status(cid).status.state == cri.CONTAINER_RUNNING
        score = client.exec_sync(cid, ["cat", "/proc/self/oom_score_adj"]).stdout.strip()
        assert score == (b"-997" if can_lower_oom_score_adj() else b"0")
    finally:
        cleanup(client, pod_id)


def test_a_recursive_read_only_mount_is_read_only_down_to_its_submounts(client, pulled_busybox, tmp_path):
    handlers = {h.name: h for h in client.runtime.Status(cri.StatusRequest()).runtime_handlers}
    assert handlers[""].features.recursive_read_only_mounts and handlers["runc"].features.recursive_read_only_mounts
    host = tmp_path / "volume"
    (host / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "pyshim-rro-test", str(host / "sub")], check=True)
    pod = pod_config()
    pod_id = client.run_pod(pod)
    try:
        def container(name: str, rro: bool) -> str:
            mount = cri.Mount(container_path="/mnt", host_path=str(host), readonly=True, recursive_read_only=rro)
            cid = client.create(pod_id, container_config(pulled_busybox, ["sleep", "3600"], name=name,
                                                         mounts=[mount]), pod)
            client.start(cid)
            return cid

        plain, recursive = container("plain", False), container("recursive", True)
        # A plain read-only bind leaves the submount writable; the recursive one does not.
        assert client.exec_sync(plain, ["touch", "/mnt/sub/file"]).exit_code == 0
        refused = client.exec_sync(recursive, ["touch", "/mnt/sub/other"])
        assert refused.exit_code != 0 and b"Read-only file system" in refused.stderr
        assert not (host / "sub" / "other").exists()

        code, details = _code_of(lambda: client.create(pod_id, container_config(
            pulled_busybox, ["true"], name="writable", mounts=[cri.Mount(
                container_path="/mnt", host_path=str(host), readonly=False, recursive_read_only=True)]), pod))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs readonly" in details
    finally:
        cleanup(client, pod_id)
        subprocess.run(["umount", str(host / "sub")], check=True)


def test_container_status_reports_the_identity_the_process_runs_with(client, pulled_busybox):
    features = client.runtime.Status(cri.StatusRequest()).features
    assert features.supplemental_groups_policy
    sc = cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(value=4321), supplemental_groups=[1234, 5678])
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sleep", "3600"],
                                     linux=cri.LinuxContainerConfig(security_context=sc))
    try:
        user = client.status(cid).status.user.linux
        assert (user.uid, user.gid) == (4321, 0)  # no passwd entry for 4321: group 0, as containerd does
        assert list(user.supplemental_groups) == [0, 1234, 5678]
        seen = client.exec_sync(cid, ["id", "-G"]).stdout.decode().split()
        assert sorted(map(int, seen)) == sorted(user.supplemental_groups)
    finally:
        cleanup(client, pod_id)
