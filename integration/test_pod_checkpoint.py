"""CheckpointPod and RestorePod (cri-api v0.37) end to end: real runc, CRIU, CNI, over the CRI wire."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as cri
from criu_glue import pod_checkpoint as podfmt
from criu_glue.archive import open_archive
from integration.conftest import container_config, discard, new_settings, pod_config
from integration.daemon import Daemon, leftovers, remove_everything
from integration.test_checkpoint import (_error, assert_running_and_thawed, checkpoint_call_outcomes,
                                         counter_value, criu_lock_rules, wait_for_checkpoint_call, wait_for_rss)
from integration.test_lifecycle import cleanup
from pyshim.cli import main as cli_main

# The server echoes over the pod's loopback; the client sends a numbered line every 0.1 s and
# appends the echo to /tmp/echoes. Each keeps its own counter, and the server leaves a file in
# the shared (emptyDir-like) volume for the client to read.
SERVER = ("echo from-server > /shared/hello; nc -ll -p 8080 -e /bin/cat & "
          "i=0; while true; do echo $i > /tmp/counter; i=$((i+1)); sleep 0.1; done")
CLIENT = ("while [ ! -e /shared/hello ]; do sleep 0.1; done; sleep 0.5; "
          "(j=0; while true; do echo ping $j; j=$((j+1)); sleep 0.1; done) | nc 127.0.0.1 8080 >> /tmp/echoes & "
          "i=0; while true; do echo $i > /tmp/counter; i=$((i+1)); sleep 0.1; done")


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "pod-checkpoint"
    d.mkdir(mode=0o700)
    return d


def own_pid_namespace() -> "cri.LinuxContainerConfig":
    # What kubelet sends for a pod without shareProcessNamespace (CRI's zero value means shared).
    return cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
        namespace_options=cri.NamespaceOption(pid=cri.NamespaceMode.CONTAINER)))


def new_pod() -> "cri.PodSandboxConfig":
    pod = pod_config()
    pod.linux.security_context.namespace_options.pid = cri.NamespaceMode.CONTAINER
    return pod


def pod_containers(image: str, shared: Path) -> list:
    volume = [cri.Mount(container_path="/shared", host_path=str(shared))]
    return [container_config(image, ["sh", "-c", SERVER], name="server", mounts=volume, linux=own_pid_namespace()),
            container_config(image, ["sh", "-c", CLIENT], name="client", mounts=volume, linux=own_pid_namespace())]


def run_pod(client, configs, pod=None):
    pod = pod or new_pod()
    pod_id = client.run_pod(pod)
    try:
        ids = []
        for config in configs:
            ids.append(client.create(pod_id, config, pod))
            client.start(ids[-1])
    except BaseException:
        cleanup(client, pod_id)
        raise
    return pod, pod_id, ids


def checkpoint_pod(client, pod_id, ids, out: Path, timeout=120, **options):
    client.runtime.CheckpointPod(cri.CheckpointPodRequest(
        pod_sandbox_id=pod_id, output_path=str(out), container_ids=ids, options=options), timeout=timeout)


def restore_pod(client, out: Path, pod, configs, timeout=120, **kwargs):
    return client.runtime.RestorePod(cri.RestorePodRequest(
        checkpoint_path=str(out), config=pod, container_configs=configs, **kwargs), timeout=timeout)


def echoes(client, cid) -> int:
    return int(client.exec_sync(cid, ["sh", "-c", "cat /tmp/echoes 2>/dev/null | wc -l"]).stdout)


def wait_for(predicate, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_pod_checkpoint_and_restore_keeps_the_loopback_connection(client, daemon, pulled_busybox, out_dir,
                                                                   tmp_path, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    configs = pod_containers(pulled_busybox, shared)
    pod, pod_id, (server, client_c) = run_pod(client, configs)
    try:
        wait_for(lambda: echoes(client, client_c) > 3, "the client never got an echo over loopback")
        checkpoint_pod(client, pod_id, [server, client_c], out_dir)
        # Both keep running, thawed, after the call.
        for cid in (server, client_c):
            assert_running_and_thawed(client, daemon, cid)
        at_checkpoint = {}
        manifest = podfmt.read_manifest(out_dir)
        assert [c.name for c in manifest.containers] == ["server", "client"]
        assert manifest.pod_config["metadata"]["name"] == pod.metadata.name
        assert manifest.pod_ips and manifest.engine == "pyshim"
        # The loopback connection was seen from both ends.
        assert any(c.loopback for c in manifest.container("client").tcp_connections)
        assert any(c.loopback for c in manifest.container("server").tcp_connections)
        # Each part is an ordinary container archive.
        for entry in manifest.containers:
            with open_archive(out_dir / entry.part) as archive:
                assert archive.config().name == entry.name
                at_checkpoint[entry.name] = archive.config().checkpointed_time_ns
        assert sorted(p.name for p in out_dir.iterdir()) == ["containers", podfmt.MANIFEST]
        # `pyshim inspect-checkpoint DIR`: the pod's summary, then every part as a container archive.
        capsys.readouterr()
        assert cli_main(["inspect-checkpoint", str(out_dir)]) == 0
        shown = capsys.readouterr().out
        assert "Pod checkpoint" in shown and "server" in shown and "client" in shown
        assert shown.count("containers/") >= 2
    finally:
        cleanup(client, pod_id)

    # Restore into a new pod (the source is gone, as after a move).
    response = restore_pod(client, out_dir, new_pod(), configs)
    restored = {c.name: c.container_id for c in response.restored_containers}
    try:
        assert set(restored) == {"server", "client"}
        for cid in restored.values():
            assert client.status(cid).status.state == cri.CONTAINER_CREATED
        # The first StartContainer restores the pod's containers together (pod_restore_start.py): the
        # client runs before its own StartContainer, which then answers OK without restoring it again.
        client.start(restored["server"])
        assert client.status(restored["client"]).status.state == cri.CONTAINER_RUNNING
        for cid in restored.values():
            client.start(cid)
        for cid in restored.values():
            status = client.status(cid, verbose=True)
            assert status.status.state == cri.CONTAINER_RUNNING
            assert json.loads(status.info["info"])["restored"] is True
        # The counters continue (not restarted), and the loopback connection still carries echoes.
        for cid in restored.values():
            _assert_progress(client, cid)
        before = echoes(client, restored["client"])
        wait_for(lambda: echoes(client, restored["client"]) > before + 3,
                 "the loopback connection between the restored containers does not carry echoes")
        assert client.exec_sync(restored["client"], ["cat", "/shared/hello"]).stdout == b"from-server\n"
        # The checkpoint was only read.
        assert podfmt.read_manifest(out_dir) == manifest
    finally:
        cleanup(client, response.pod_sandbox_id)


def _assert_progress(client, cid) -> None:
    before = counter_value(client, cid)
    assert before > 0, "the counter restarted from zero"
    wait_for(lambda: counter_value(client, cid) > before, f"container {cid} makes no progress")


def test_bad_checkpoint_pod_requests_freeze_nothing_and_write_nothing(client, daemon, pulled_busybox, out_dir,
                                                                      tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    pod, pod_id, ids = run_pod(client, pod_containers(pulled_busybox, shared))
    other_pod, other_id, (other,) = run_pod(client, [container_config(pulled_busybox, ["sleep", "300"],
                                                                      linux=own_pid_namespace())])
    try:
        def code_of(**overrides):
            request = dict(pod_sandbox_id=pod_id, output_path=str(out_dir), container_ids=ids)
            request.update(overrides)
            return _error(lambda: client.runtime.CheckpointPod(cri.CheckpointPodRequest(**request), timeout=60))

        assert code_of(pod_sandbox_id="0" * 64)[0] == grpc.StatusCode.NOT_FOUND
        assert code_of(container_ids=[])[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(container_ids=[ids[0], ids[0]])[0] == grpc.StatusCode.INVALID_ARGUMENT
        code, details = code_of(container_ids=[ids[0], other])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and other in details
        assert code_of(output_path="relative/dir")[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(output_path=str(tmp_path / "missing"))[0] == grpc.StatusCode.INVALID_ARGUMENT
        code, details = code_of(options={"leave-running": "false"})
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "leave-running" in details
        assert code_of(options={"compression": "lz4"})[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(options={"tcp": "sometimes"})[0] == grpc.StatusCode.INVALID_ARGUMENT
        # No deadline: refused (the CRI requires one).
        with pytest.raises(grpc.RpcError) as err:
            client.runtime.CheckpointPod(cri.CheckpointPodRequest(
                pod_sandbox_id=pod_id, output_path=str(out_dir), container_ids=ids))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "deadline" in err.value.details()
        (out_dir / "someone-elses").write_text("x")
        assert code_of()[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert sorted(p.name for p in out_dir.iterdir()) == ["someone-elses"]
        for cid in ids:
            assert_running_and_thawed(client, daemon, cid)
    finally:
        cleanup(client, other_id)
        cleanup(client, pod_id)


def test_criu_failing_on_one_container_thaws_all_and_empties_the_output(client, daemon, pulled_busybox, out_dir):
    counter = "i=0; while true; do echo $i > /tmp/counter; i=$((i+1)); sleep 0.1; done"
    # The second container holds a deleted 4 MiB file open: more than CRIU's ghost-file limit (1 MiB),
    # so CRIU refuses to dump it.
    configs = [container_config(pulled_busybox, ["sh", "-c", counter], name=f"c{i}", linux=own_pid_namespace())
               for i in range(3)]
    ghost = f"dd if=/dev/zero of=/tmp/ghost bs=1M count=4 2>/dev/null; exec 3</tmp/ghost; rm /tmp/ghost; {counter}"
    configs[1] = container_config(pulled_busybox, ["sh", "-c", ghost], name="c1", linux=own_pid_namespace())
    pod, pod_id, ids = run_pod(client, configs)
    try:
        counter_value(client, ids[1])  # the counter runs only once the ghost file is held
        code, details = _error(lambda: checkpoint_pod(client, pod_id, ids, out_dir))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert ids[1] in details and "CRIU log" in details, details
        assert list(out_dir.iterdir()) == []
        work = daemon.settings.root / "checkpoint-work"
        assert not work.exists() or list(work.iterdir()) == []
        for cid in ids:
            assert_running_and_thawed(client, daemon, cid)
    finally:
        cleanup(client, pod_id)


def test_pod_checkpoint_past_its_deadline_thaws_all_and_lifts_criu_network_lock(client, daemon, pulled_busybox,
                                                                                  out_dir):
    """Both CRIUs are stopped mid-dump at the deadline. Each locked the pod's network (one shared
    namespace) and cannot lift it: pyshim does, once the last of them has ended."""
    counter = "i=0; while true; do echo $i > /tmp/counter; i=$((i+1)); sleep 0.1; done"
    hold = f"(head -c 268435456 /dev/zero | tr '\\000' a; sleep 100000) | sort & {counter}"
    configs = [container_config(pulled_busybox, ["sh", "-c", hold], name=f"c{i}", linux=own_pid_namespace())
               for i in range(2)]
    pod, pod_id, ids = run_pod(client, configs)
    try:
        for cid in ids:
            wait_for_rss(client, cid, 256 * 2**20)
        done = len(checkpoint_call_outcomes(daemon, "checkpoint_pod"))
        code, details = _error(lambda: checkpoint_pod(client, pod_id, ids, out_dir, timeout=0.5))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
        # The daemon too must see a deadline (its CRIUs stopped), not an error.
        assert wait_for_checkpoint_call(daemon, done, call="checkpoint_pod") == "DEADLINE_EXCEEDED"
        assert list(out_dir.iterdir()) == []
        for cid in ids:
            assert_running_and_thawed(client, daemon, cid)
        assert criu_lock_rules(daemon, pod_id) == []
    finally:
        cleanup(client, pod_id)


def test_restore_pod_refuses_bad_requests_and_leaves_nothing(client, pulled_busybox, out_dir, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    configs = pod_containers(pulled_busybox, shared)
    pod, pod_id, ids = run_pod(client, configs)
    try:
        wait_for(lambda: echoes(client, ids[1]) > 0, "no echo")
        checkpoint_pod(client, pod_id, ids, out_dir)
    finally:
        cleanup(client, pod_id)

    def refused(configs=configs, path=out_dir, **kwargs):
        code, details = _error(lambda: restore_pod(client, path, new_pod(), configs, **kwargs))
        assert not client.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items, "a sandbox was left"
        assert not client.runtime.ListContainers(cri.ListContainersRequest()).containers
        return code, details

    code, details = refused(configs=configs[:1])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "client" in details
    renamed = cri.ContainerConfig()
    renamed.CopyFrom(configs[1])
    renamed.metadata.name = "other"
    assert refused(configs=[configs[0], renamed])[0] == grpc.StatusCode.INVALID_ARGUMENT
    changed = cri.ContainerConfig()
    changed.CopyFrom(configs[1])
    changed.args.append("extra")
    code, details = refused(configs=[configs[0], changed])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "args" in details
    env = cri.ContainerConfig()
    env.CopyFrom(configs[0])
    env.envs.append(cri.KeyValue(key="NEW", value="1"))
    assert refused(configs=[env, configs[1]])[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert refused(runtime_handler="kata")[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert refused(options={"x": "y"})[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert refused(path=tmp_path / "nowhere")[0] == grpc.StatusCode.NOT_FOUND
    # A hostile part: a symlink instead of the archive.
    hostile = tmp_path / "hostile"
    (hostile / "containers").mkdir(parents=True)
    (hostile / podfmt.MANIFEST).write_bytes((out_dir / podfmt.MANIFEST).read_bytes())
    (hostile / "containers" / "0.tar").symlink_to("/etc/shadow")
    (hostile / "containers" / "1.tar").write_bytes((out_dir / "containers" / "1.tar").read_bytes())
    code, details = refused(path=hostile)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "regular file" in details
    # A corrupt part: refused by the container archive checks, after the sandbox would be needed.
    corrupt = tmp_path / "corrupt"
    (corrupt / "containers").mkdir(parents=True)
    (corrupt / podfmt.MANIFEST).write_bytes((out_dir / podfmt.MANIFEST).read_bytes())
    (corrupt / "containers" / "0.tar").write_bytes(b"not a tar" * 100)
    (corrupt / "containers" / "1.tar").write_bytes((out_dir / "containers" / "1.tar").read_bytes())
    assert refused(path=corrupt)[0] == grpc.StatusCode.INVALID_ARGUMENT
    # A pod sharing its PID namespace is refused with a clear reason.
    shared_pid = pod_config()
    shared_pid.linux.security_context.namespace_options.pid = cri.NamespaceMode.POD
    code, details = _error(lambda: restore_pod(client, out_dir, shared_pid, configs))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "PID namespace" in details


@pytest.fixture
def crash_daemon(registry, busybox_ref):
    settings = new_settings("pc", "10.86.7.0/24")
    d = Daemon(settings)
    yield d
    d.start()
    with d.client() as c:
        remove_everything(c)
    d.stop()
    found = leftovers(settings) + discard(settings)
    assert not found, f"left behind: {found}"


def test_daemon_killed_while_the_pod_is_frozen_thaws_it_at_restart(crash_daemon, busybox_ref, out_dir):
    counter = "i=0; while true; do echo $i > /tmp/counter; i=$((i+1)); sleep 0.1; done"
    crash_daemon.start(crash_at="checkpoint_pod:frozen")
    with crash_daemon.client() as c:
        c.pull(busybox_ref)
        pod, pod_id, ids = run_pod(c, [container_config(busybox_ref, ["sh", "-c", counter], name=f"c{i}",
                                                        linux=own_pid_namespace()) for i in range(2)])
        with pytest.raises(grpc.RpcError):
            checkpoint_pod(c, pod_id, ids, out_dir)
    crash_daemon.wait_crashed()
    runc_root = str(crash_daemon.settings.state_dir / "runc")
    # Killed with both frozen (the crash point is right after the last freeze).
    assert {runc_state(runc_root, cid) for cid in ids} == {"paused"}
    crash_daemon.start()
    with crash_daemon.client() as c:
        for cid in ids:
            assert runc_state(runc_root, cid) == "running"
            _assert_progress(c, cid)
        assert list(out_dir.iterdir()) == []
        work = crash_daemon.settings.root / "checkpoint-work"
        assert not work.exists() or list(work.iterdir()) == []
        # And the pod can be checkpointed now.
        checkpoint_pod(c, pod_id, ids, out_dir)
        assert podfmt.is_pod_checkpoint(out_dir)
        cleanup(c, pod_id)


def runc_state(root: str, cid: str) -> str:
    out = subprocess.run(["runc", "--root", root, "state", cid], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["status"]
