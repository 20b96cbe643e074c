"""`pyshim migrate` between two nodes on this machine, and a host restart of one node, as a user runs them:
the CLI against real daemons, real runc/CRIU, a real registry, clients in the nodes' network namespaces."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cri_api import api_pb2 as cri
from integration.conftest import container_config, pod_config
from integration.test_checkpoint import COUNTER
from integration.test_checkpoint_stop import ticks
from pyshim.internal.cri_log import read_log

ECHO = ["nc", "-ll", "-p", "7000", "-e", "/bin/cat"]

def pyshim(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pyshim", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pyshim {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def migrate(nodes, source, target, cid: str, work_dir: Path, *extra: str, check: bool = True):
    return pyshim("migrate", cid, "--from", source.endpoint, "--to", target.endpoint,
                  "--registry", f"{nodes.registry.address}/checkpoints", "--insecure",
                  "--work-dir", str(work_dir), *extra, check=check)


def run_pod(node, image, command, pod=None, **kwargs):
    pod = pod or pod_config()
    with node.client() as c:
        c.pull(image)
        pod_id = c.run_pod(pod)
        cid = c.create(pod_id, container_config(image, command, **kwargs), pod)
        c.start(cid)
    return pod_id, cid


def containers(node) -> list:
    with node.client() as c:
        return list(c.runtime.ListContainers(cri.ListContainersRequest()).containers)


def pods(node) -> list:
    with node.client() as c:
        return list(c.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items)


def log_ticks(node, cid) -> list[int]:
    with node.client() as c:
        path = Path(c.status(cid).status.log_path)
    return ticks([e.text for e in read_log(path)])


def assert_consecutive(values: list[int]) -> None:
    assert values == list(range(values[0], values[0] + len(values))), \
        f"gap or repeat in the counter: {values}"


@pytest.fixture
def nodes(two_nodes_clean):
    """The two nodes; what a test leaves running on them (its moved pods) is removed after it."""
    yield two_nodes_clean
    two_nodes_clean.remove_everything()


@pytest.fixture
def work_dir(tmp_path):
    d = tmp_path / "migrate"
    d.mkdir(mode=0o700)
    return d


def test_counter_moves_to_b_and_back_without_gaps_or_repeats(nodes, work_dir):
    _, cid = run_pod(nodes.a, nodes.busybox_ref, ["sh", "-c", COUNTER])
    time.sleep(1)

    there = json.loads(migrate(nodes, nodes.a, nodes.b, cid, work_dir, "--json").stdout)
    assert not containers(nodes.a) and not pods(nodes.a), "the source kept the moved container or its pod"
    moved = there["target_container"]
    assert [c.id for c in containers(nodes.b)] == [moved]
    assert there["downtime_ms"] > 0 and there["archive_bytes"] > 0
    assert {"preflight", "checkpoint", "build_image", "push", "pull", "create_pod", "start"} <= set(there["phases_ms"])
    assert {"dump", "archive"} <= set(there["checkpoint_phases_ms"]) and "runc_restore" in there["restore_phases_ms"]
    assert there["tcp"] == "none"
    time.sleep(0.5)
    on_b = log_ticks(nodes.b, moved)
    assert on_b[0] == 0 and len(on_b) > 12
    assert_consecutive(on_b)
    with nodes.b.client() as c:
        ip_b = c.pod_status(there["target_pod"]).status.network.ip
    assert ip_b.startswith(nodes.b.pod_subnet.rsplit(".", 1)[0])

    back = json.loads(migrate(nodes, nodes.b, nodes.a, moved, work_dir, "--json").stdout)
    assert not containers(nodes.b) and not pods(nodes.b)
    time.sleep(0.5)
    on_a = log_ticks(nodes.a, back["target_container"])
    assert len(on_a) > len(on_b)
    assert_consecutive(on_a)
    assert not list(work_dir.iterdir()), f"the work dir kept {list(work_dir.iterdir())}"


def test_echo_service_moves_and_its_clients_see_a_reset_but_the_listener_lives(nodes, work_dir):
    pod_id, cid = run_pod(nodes.a, nodes.busybox_ref, ECHO)
    with nodes.a.client() as c:
        ip_a = c.pod_status(pod_id).status.network.ip
    with nodes.b.line_client(ip_a, 7000) as client:
        assert client.ask("before") == "before"

        out = migrate(nodes, nodes.a, nodes.b, cid, work_dir).stdout
        # A new node means a new pod address: the connection cannot follow, and the CLI says so.
        assert "tcp       close" in out, out
        assert out.startswith(f"moved {cid} -> container ")
        moved = containers(nodes.b)[0]
        with nodes.b.client() as c:
            ip_b = c.pod_status(moved.pod_sandbox_id).status.network.ip
            info = json.loads(c.status(moved.id, verbose=True).info["info"])
        assert info["restoreTcp"] == "close" and ip_b != ip_a
        # The listener came along and serves at the new address.
        assert nodes.a.tcp_exchange(ip_b, 7000, b"after\n") == b"after\n"


def test_host_restart_keeps_pod_addresses_tcp_clients_counters_and_locks(nodes, tmp_path):
    node = nodes.a
    echo_pod = pod_config(name="echo")
    echo_pod_id, _ = run_pod(node, nodes.busybox_ref, ECHO, pod=echo_pod)
    counter_pod_id, counter_id = run_pod(node, nodes.busybox_ref, [
        "sh", "-c", f"mkdir -p /data && locker hold /data/f /data/p /data/o & {COUNTER}"], pod=pod_config(name="work"))
    with node.client() as c:
        echo_ip = c.pod_status(echo_pod_id).status.network.ip
        counter_ip = c.pod_status(counter_pod_id).status.network.ip
    time.sleep(1)
    with node.line_client(echo_ip, 7000) as client:
        assert client.ask("one") == "one"

        saved = tmp_path / "host-restart"
        out = pyshim("node", "checkpoint-all", "--endpoint", node.endpoint, "--dir", str(saved)).stdout
        assert out.count("checkpointed ") == 2, out
        assert not pods(node), "checkpoint-all left the saved pods (their addresses stay taken)"
        # The host goes down: the daemon stops and /run is lost.
        node.daemon.stop()
        shutil.rmtree(node.settings.state_dir, ignore_errors=True)
        node.daemon.start()
        out = pyshim("node", "restore-all", "--endpoint", node.endpoint, "--dir", str(saved)).stdout
        assert out.count("restored ") == 2, out
        assert not (saved / "manifest.json").exists()

        by_name = {p.metadata.name: p for p in pods(node)}
        assert set(by_name) == {"echo", "work"}
        with node.client() as c:
            assert c.pod_status(by_name["echo"].id).status.network.ip == echo_ip
            assert c.pod_status(by_name["work"].id).status.network.ip == counter_ip
            echo = [x for x in c.runtime.ListContainers(cri.ListContainersRequest()).containers
                    if x.pod_sandbox_id == by_name["echo"].id][0]
            info = json.loads(c.status(echo.id, verbose=True).info["info"])
        assert info["restoreTcp"] == "established"

        # The client outside the pod kept its connection through it all.
        assert client.ask("two") == "two"

        work = [x for x in containers(node) if x.pod_sandbox_id == by_name["work"].id][0]
        time.sleep(0.5)
        assert_consecutive(log_ticks(node, work.id))
        with node.client() as c:
            for kind, path in (("flock", "/data/f"), ("posix", "/data/p"), ("ofd", "/data/o")):
                probe = c.exec_sync(work.id, ["locker", "probe", kind, path], timeout=10)
                assert probe.stdout.decode().strip() == "held", (kind, probe.stdout, probe.stderr)


def test_registry_refusing_leaves_the_workload_running_on_a(nodes, work_dir):
    pod_id, cid = run_pod(nodes.a, nodes.busybox_ref, ["sleep", "600"])
    host = nodes.registry.address.split(":")[0]
    proc = pyshim("migrate", cid, "--from", nodes.a.endpoint, "--to", nodes.b.endpoint,
                  "--registry", f"{host}:1/checkpoints", "--insecure", "--work-dir", str(work_dir), check=False)
    assert proc.returncode == 1
    assert f"{host}:1" in proc.stderr and "upload" in proc.stderr, proc.stderr
    with nodes.a.client() as c:
        assert c.status(cid).status.state == cri.CONTAINER_RUNNING
    assert not containers(nodes.b) and not list(work_dir.glob("*.tar"))


def test_target_without_the_base_image_is_refused_before_freezing(nodes, work_dir):
    # An image that node A has and nobody can pull any more.
    from integration.testimage import push_busybox

    ref = push_busybox(nodes.registry.address, repo="vanishing", labels={"unique": uuid.uuid4().hex})
    pod_id, cid = run_pod(nodes.a, ref, ["sleep", "600"])
    shutil.rmtree(nodes.registry.storage_dir / "docker/registry/v2/repositories/vanishing")
    proc = migrate(nodes, nodes.a, nodes.b, cid, work_dir, check=False)
    assert proc.returncode == 1 and "cannot pull the base image" in proc.stderr, proc.stderr
    with nodes.a.client() as c:
        status = c.status(cid, verbose=True)
    assert status.status.state == cri.CONTAINER_RUNNING
    assert not json.loads(status.info["info"])["lastCheckpoint"], "A was checkpointed although B could not restore"
    assert not containers(nodes.b)


@pytest.mark.parametrize("then", ["rerun", "rollback"])
def test_killed_migrate_is_finished_or_rolled_back_by_a_rerun(nodes, work_dir, then):
    _, cid = run_pod(nodes.a, nodes.busybox_ref, ["sh", "-c", COUNTER])
    time.sleep(1)
    journal = work_dir / f"{cid}.json"
    proc = subprocess.Popen([sys.executable, "-m", "pyshim", "migrate", cid, "--from", nodes.a.endpoint,
                             "--to", nodes.b.endpoint, "--registry", f"{nodes.registry.address}/checkpoints",
                             "--insecure", "--work-dir", str(work_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if json.loads(journal.read_text())["phase"] in ("checkpointed", "pushed"):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail("the move never reached the checkpointed phase")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with nodes.a.client() as c:
        assert c.status(cid).status.state == cri.CONTAINER_EXITED  # dead on A, not yet on B

    if then == "rerun":
        out = migrate(nodes, nodes.a, nodes.b, cid, work_dir).stdout
        assert "resuming" in out
        moved = containers(nodes.b)
        assert len(moved) == 1 and moved[0].state == cri.CONTAINER_RUNNING
        assert not containers(nodes.a)
        survivor = (nodes.b, moved[0].id)
    else:
        migrate(nodes, nodes.a, nodes.b, cid, work_dir, "--rollback")
        assert not containers(nodes.b) and not pods(nodes.b)
        back = [c for c in containers(nodes.a) if c.state == cri.CONTAINER_RUNNING]
        assert len(back) == 1 and back[0].id != cid
        survivor = (nodes.a, back[0].id)
    time.sleep(0.5)
    assert_consecutive(log_ticks(*survivor))
    assert not journal.exists()


def test_registry_refusing_our_credentials_names_it_and_the_step(nodes, work_dir, tmp_path):
    from integration.registry_server import RegistryServer
    from integration.test_registry_pull import _bcrypt_htpasswd_line

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(_bcrypt_htpasswd_line("alice", "s3cret"))
    pod_id, cid = run_pod(nodes.a, nodes.busybox_ref, ["sleep", "600"])
    with RegistryServer(host=nodes.wire_gateway,
                        auth_yaml=f"  htpasswd:\n    realm: pyshim-test\n    path: {htpasswd}\n") as private:
        address = private.address
        proc = pyshim("migrate", cid, "--from", nodes.a.endpoint, "--to", nodes.b.endpoint,
                      "--registry", f"{address}/checkpoints", "--insecure", "--creds", "alice:wrong",
                      "--work-dir", str(work_dir), check=False)
    assert proc.returncode == 1
    assert address in proc.stderr and "push access check" in proc.stderr and "401" in proc.stderr, proc.stderr
    with nodes.a.client() as c:
        assert c.status(cid).status.state == cri.CONTAINER_RUNNING
    assert not containers(nodes.b)
