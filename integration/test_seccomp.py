"""Seccomp as a user sees it: RuntimeDefault, Unconfined, Localhost and privileged containers, and restore."""
from __future__ import annotations

import json
import time

import grpc
import pytest

from cri_api import api_pb2 as cri
from integration.conftest import container_config, pod_config
from integration.test_checkpoint import COUNTER, checkpoint, counter_value
from integration.test_lifecycle import cleanup, run_container
from integration.test_restore import expect_failed_start, restore_into_new_pod

# The container's own process records its PID: in a pod's shared PID namespace it is not PID 1.
MAIN_PID_FILE = "/tmp/main-pid"
SLEEP = ["sh", "-c", f"echo $$ > {MAIN_PID_FILE}; exec sleep 3600"]
# Creating a user namespace needs no capability: only a seccomp profile stops it in these containers.
UNSHARE_USERNS = ["unshare", "-U", "true"]
BLOCK_CHMOD = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}]}


def seccomp_linux(profile_type=None, localhost_ref: str = "", **security) -> cri.LinuxContainerConfig:
    if profile_type is not None:
        security["seccomp"] = cri.SecurityProfile(profile_type=profile_type, localhost_ref=localhost_ref)
    return cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(**security))


def seccomp_status(client, cid, process: str = "self") -> str:
    """The Seccomp: line of /proc/self/status (an exec'd process) or of the container's own process ("main")."""
    script = f"grep Seccomp: /proc/{process}/status"
    if process == "main":  # the container may not have written its PID yet
        script = f"while [ ! -s {MAIN_PID_FILE} ]; do sleep 0.05; done; grep Seccomp: /proc/$(cat {MAIN_PID_FILE})/status"
    result = client.exec_sync(cid, ["sh", "-c", script], timeout=30)
    assert result.exit_code == 0, result
    return result.stdout.decode().split()[1]


def test_status_says_what_is_enforced(client):
    info = json.loads(client.runtime.Status(cri.StatusRequest()).info["seccomp"])
    assert info["enabled"] is True
    assert "moby/profiles/seccomp" in info["runtimeDefault"] and info["privileged"].startswith("unconfined")


@pytest.mark.parametrize("linux, status, unshare_blocked", [
    (seccomp_linux(cri.SecurityProfile.RuntimeDefault), "2", True),
    (seccomp_linux(cri.SecurityProfile.Unconfined), "0", False),
    (seccomp_linux(), "0", False),  # no profile at all: unconfined, as in containerd
    (seccomp_linux(cri.SecurityProfile.RuntimeDefault, privileged=True), "0", False),
], ids=["runtime-default", "unconfined", "unset", "privileged"])
def test_seccomp_status_and_what_the_default_profile_blocks(client, pulled_busybox, linux, status, unshare_blocked):
    _, pod_id, cid = run_container(client, pulled_busybox, SLEEP, linux=linux)
    try:
        assert seccomp_status(client, cid) == status  # an exec'd process
        assert seccomp_status(client, cid, "main") == status  # the container's own process
        result = client.exec_sync(cid, UNSHARE_USERNS)
        if unshare_blocked:
            assert result.exit_code != 0 and b"Operation not permitted" in result.stderr, result
        else:
            assert result.exit_code == 0, result
    finally:
        cleanup(client, pod_id)


def test_localhost_profile_from_the_node_is_enforced(client, pulled_busybox, tmp_path):
    profile = tmp_path / "block-chmod.json"
    profile.write_text(json.dumps(BLOCK_CHMOD))
    _, pod_id, cid = run_container(client, pulled_busybox, SLEEP,
                                   linux=seccomp_linux(cri.SecurityProfile.Localhost, str(profile)))
    try:
        assert seccomp_status(client, cid) == "2"
        result = client.exec_sync(cid, ["chmod", "400", "/"])
        assert result.exit_code != 0 and b"Operation not permitted" in result.stderr, result
        assert client.exec_sync(cid, UNSHARE_USERNS).exit_code == 0  # this profile allows everything else
    finally:
        cleanup(client, pod_id)


def test_missing_or_invalid_localhost_profile_is_invalid_argument_and_leaves_nothing(client, pulled_busybox,
                                                                                      tmp_path):
    invalid = tmp_path / "invalid.json"
    invalid.write_text('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["chmod"], "action": "DENY"}]}')
    pod = pod_config()
    pod_id = client.run_pod(pod)
    try:
        for path, words in ((tmp_path / "missing.json", "no such file"), (invalid, "unknown action 'DENY'")):
            config = container_config(pulled_busybox, SLEEP,
                                      linux=seccomp_linux(cri.SecurityProfile.Localhost, str(path)))
            with pytest.raises(grpc.RpcError) as err:
                client.create(pod_id, config, pod)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert str(path) in err.value.details() and words in err.value.details()
        assert not client.runtime.ListContainers(cri.ListContainersRequest()).containers
    finally:
        cleanup(client, pod_id)


def checkpointed(client, image, archive, linux) -> None:
    _, pod_id, cid = run_container(client, image, ["sh", "-c", f"echo $$ > {MAIN_PID_FILE}; {COUNTER}"], linux=linux)
    try:
        time.sleep(0.5)
        assert counter_value(client, cid) >= 0
        checkpoint(client, cid, archive)
    finally:
        cleanup(client, pod_id)


def test_restore_keeps_the_checkpointed_filter(client, pulled_busybox, tmp_path):
    archive = tmp_path / "confined.tar"
    runtime_default = seccomp_linux(cri.SecurityProfile.RuntimeDefault)
    checkpointed(client, pulled_busybox, archive, runtime_default)
    _, pod_id, cid = restore_into_new_pod(client, str(archive), linux=runtime_default)
    try:
        assert client.status(cid).status.state == cri.CONTAINER_RUNNING
        assert seccomp_status(client, cid, "main") == "2"  # CRIU restored the process's filter
        first = counter_value(client, cid)
        time.sleep(0.3)
        assert counter_value(client, cid) > first
        assert client.exec_sync(cid, UNSHARE_USERNS).exit_code != 0  # exec gets the new request's profile
    finally:
        cleanup(client, pod_id)


def test_restore_naming_a_missing_localhost_profile_is_refused_at_create(client, pulled_busybox, tmp_path):
    archive = tmp_path / "unconfined.tar"
    checkpointed(client, pulled_busybox, archive, seccomp_linux(cri.SecurityProfile.Unconfined))
    missing = tmp_path / "missing.json"
    pod = pod_config()
    pod_id = client.run_pod(pod)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.create(pod_id, container_config(
                str(archive), [], linux=seccomp_linux(cri.SecurityProfile.Localhost, str(missing))), pod)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and str(missing) in err.value.details()
        assert not client.runtime.ListContainers(cri.ListContainersRequest()).containers
    finally:
        cleanup(client, pod_id)


def test_restore_of_an_unconfined_checkpoint_asking_for_a_profile_is_refused(client, pulled_busybox, tmp_path):
    archive = tmp_path / "unconfined.tar"
    checkpointed(client, pulled_busybox, archive, seccomp_linux(cri.SecurityProfile.Unconfined))
    pod = pod_config()
    pod_id = client.run_pod(pod)
    try:
        cid = client.create(pod_id, container_config(
            str(archive), [], linux=seccomp_linux(cri.SecurityProfile.RuntimeDefault)), pod)
        error = expect_failed_start(client, cid, grpc.StatusCode.FAILED_PRECONDITION)
        assert "without a seccomp filter" in error.details()
        assert not any(c.state == cri.CONTAINER_RUNNING
                       for c in client.runtime.ListContainers(cri.ListContainersRequest()).containers)
    finally:
        cleanup(client, pod_id)
    # the same archive restores when the request does not ask for more than it had
    _, pod_id, cid = restore_into_new_pod(client, str(archive), linux=seccomp_linux(cri.SecurityProfile.Unconfined))
    try:
        assert seccomp_status(client, cid, "main") == "0"
    finally:
        cleanup(client, pod_id)
