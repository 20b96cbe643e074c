"""`pyshim migrate --pod` between the two test nodes, as a user runs it: the CLI against real daemons, real
runc/CRIU/CNI. A pod of two containers that talk over the pod's loopback and share a file in an
emptyDir-like volume (a host directory, which both test nodes see) moves with one consistent cut."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cri_api import api_pb2 as cri
from integration.test_migrate import containers, pods, pyshim
from integration.test_pod_checkpoint import echoes, new_pod, own_pid_namespace, wait_for
from integration.conftest import container_config

# Each counter appends every value to its own file in the shared volume: across the move the values
# must stay consecutive (no gap: nothing lost at the cut; no repeat: the source stopped at the cut and
# the target resumed from exactly there). The client keeps one connection to the server over the
# pod's loopback and appends every echo to /tmp/echoes (in its own writable layer).
SERVER = ("echo from-server > /shared/hello; nc -ll -p 8080 -e /bin/cat & "
          "i=0; while true; do echo $i >> /shared/server-ticks; i=$((i+1)); sleep 0.1; done")
CLIENT = ("while [ ! -e /shared/hello ]; do sleep 0.1; done; sleep 0.5; "
          "(j=0; while true; do echo ping $j; j=$((j+1)); sleep 0.1; done) | nc 127.0.0.1 8080 >> /tmp/echoes & "
          "i=0; while true; do echo $i >> /shared/client-ticks; i=$((i+1)); sleep 0.1; done")


def ticks(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def assert_consecutive(values: list[int]) -> None:
    assert values and values == list(range(values[0], values[0] + len(values))), \
        f"gap or repeat in the counter: {values}"


@pytest.fixture
def nodes(two_nodes_clean):
    """The two nodes; the moved pod a test leaves on the target is removed after it."""
    yield two_nodes_clean
    two_nodes_clean.remove_everything()


@pytest.fixture
def shared(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    return d


def start_pod(node, image: str, shared: Path):
    volume = [cri.Mount(container_path="/shared", host_path=str(shared))]
    configs = [container_config(image, ["sh", "-c", SERVER], name="server", mounts=volume, linux=own_pid_namespace()),
               container_config(image, ["sh", "-c", CLIENT], name="client", mounts=volume, linux=own_pid_namespace())]
    pod = new_pod()
    with node.client() as c:
        c.pull(image)
        pod_id = c.run_pod(pod)
        ids = []
        for config in configs:
            ids.append(c.create(pod_id, config, pod))
            c.start(ids[-1])
        wait_for(lambda: echoes(c, ids[1]) > 3, "the client never got an echo over loopback")
    return pod_id, ids


def migrate_pod(nodes, pod_id: str, work_dir: Path, *extra: str, check: bool = True):
    return pyshim("migrate", "--pod", pod_id, "--from", nodes.a.endpoint, "--to", nodes.b.endpoint,
                  "--work-dir", str(work_dir), *extra, check=check)


def test_a_pod_moves_with_one_cut_and_its_loopback_connection_carries_on(nodes, shared, tmp_path):
    pod_id, (server, client) = start_pod(nodes.a, nodes.busybox_ref, shared)
    work_dir = tmp_path / "migrate"
    transfer = tmp_path / "transfer"  # "the target's disk", seen here at the same path
    transfer.mkdir()

    out = migrate_pod(nodes, pod_id, work_dir, "--transfer-dir", str(transfer), "--json")
    report = json.loads(out.stdout)
    assert report["source_pod"] == pod_id and set(report["containers"]) == {"server", "client"}
    assert report["containers"]["server"]["source"] == server and report["downtime_ms"] > 0

    # Nothing of the source is left: no pod, no container, no checkpoint, no journal.
    assert pods(nodes.a) == [] and containers(nodes.a) == []
    assert list(work_dir.iterdir()) == [] and list(transfer.iterdir()) == []

    moved = {c.metadata.name: c for c in containers(nodes.b)}
    assert set(moved) == {"server", "client"}
    assert all(c.state == cri.CONTAINER_RUNNING and c.pod_sandbox_id == report["target_pod"] for c in moved.values())
    with nodes.b.client() as c:
        ip = c.pod_status(report["target_pod"]).status.network.ip
        assert ip.startswith(nodes.b.pod_subnet.rsplit(".", 2)[0])
        for cid in (moved["server"].id, moved["client"].id):
            assert json.loads(c.status(cid, verbose=True).info["info"])["restored"] is True
        # Both counters resume from the checkpointed instant, and go on.
        before = {name: len(ticks(shared / f"{name}-ticks")) for name in ("server", "client")}
        wait_for(lambda: all(len(ticks(shared / f"{n}-ticks")) > before[n] + 3 for n in before),
                 "the moved counters make no progress")
        for name in ("server", "client"):
            values = ticks(shared / f"{name}-ticks")
            assert values[0] == 0
            assert_consecutive(values)
        # The loopback connection between them still carries echoes, and the shared file is there.
        client_id = moved["client"].id
        after_move = echoes(c, client_id)
        wait_for(lambda: echoes(c, client_id) > after_move + 3,
                 "the loopback connection between the moved containers does not carry echoes")
        lines = c.exec_sync(client_id, ["cat", "/tmp/echoes"]).stdout.decode().split("\n")[:-1]
        assert lines == [f"ping {j}" for j in range(len(lines))], "echoes lost or repeated over the move"
        assert c.exec_sync(client_id, ["cat", "/shared/hello"]).stdout == b"from-server\n"


def test_a_pod_that_cannot_be_restored_elsewhere_is_refused_before_anything_stops(nodes, tmp_path):
    with nodes.a.client() as c:
        c.pull(nodes.busybox_ref)
        pod = new_pod()
        pod.linux.security_context.namespace_options.pid = cri.NamespaceMode.POD  # shared PID namespace
        pod_id = c.run_pod(pod)
        cid = c.create(pod_id, container_config(nodes.busybox_ref, ["sleep", "300"]), pod)
        c.start(cid)
    work_dir = tmp_path / "migrate"
    out = migrate_pod(nodes, pod_id, work_dir, check=False)
    assert out.returncode == 1 and "PID namespace" in out.stderr, out.stderr
    assert [c.state for c in containers(nodes.a)] == [cri.CONTAINER_RUNNING]
    assert pods(nodes.b) == []
    assert list(work_dir.iterdir()) == []
    with nodes.a.client() as c:
        c.stop_pod(pod_id)
        c.remove_pod(pod_id)


def test_host_restart_saves_the_pod_at_one_instant_and_restores_it_whole(nodes, shared, tmp_path):
    """`node checkpoint-all` / `restore-all` with CheckpointPod and RestorePod: the same pod comes back at
    its address, counters without gap or repeat, and the loopback connection between its containers."""
    node = nodes.a
    pod_id, (server, client) = start_pod(node, nodes.busybox_ref, shared)
    with node.client() as c:
        ip = c.pod_status(pod_id).status.network.ip
    saved = tmp_path / "host-restart"
    out = pyshim("node", "checkpoint-all", "--endpoint", node.endpoint, "--dir", str(saved)).stdout
    assert out.count("checkpointed ") == 2 and out.count(f"-> {saved / pod_id}") == 2, out
    assert pods(node) == [], "checkpoint-all left the saved pod (its address stays taken)"
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["version"] == 2 and [p["checkpoint"] for p in manifest["pods"]] == [str(saved / pod_id)]
    # The host goes down: the daemon stops and /run is lost.
    node.daemon.stop()
    shutil.rmtree(node.settings.state_dir, ignore_errors=True)
    node.daemon.start()
    out = pyshim("node", "restore-all", "--endpoint", node.endpoint, "--dir", str(saved)).stdout
    assert out.count("restored ") == 2, out
    assert list(saved.iterdir()) == [], "restore-all kept the manifest or the pod checkpoint"

    (back,) = pods(node)
    restored = {c.metadata.name: c.id for c in containers(node)}
    with node.client() as c:
        assert c.pod_status(back.id).status.network.ip == ip
        before = {name: len(ticks(shared / f"{name}-ticks")) for name in ("server", "client")}
        wait_for(lambda: all(len(ticks(shared / f"{n}-ticks")) > before[n] + 3 for n in before),
                 "the restored counters make no progress")
        for name in ("server", "client"):
            assert_consecutive(ticks(shared / f"{name}-ticks"))
        after = echoes(c, restored["client"])
        wait_for(lambda: echoes(c, restored["client"]) > after + 3,
                 "the loopback connection does not carry echoes after the host restart")


def test_a_failure_on_the_target_after_the_cut_brings_the_pod_back_on_the_source(nodes, shared, tmp_path):
    """The target fails after the source pod stopped (its second StartContainer refused, injected at the
    client): what the target made is removed and the pod is restored on the source, at its old address,
    from the cut -- never dead on both nodes."""
    from pyshim.migration.pod_move import PodMigration, PodMoveOptions
    from pyshim.migration.workload import MoveError
    import grpc

    pod_id, _ = start_pod(nodes.a, nodes.busybox_ref, shared)
    with nodes.a.client() as c:
        ip = c.pod_status(pod_id).status.network.ip
    work_dir = tmp_path / "migrate"
    options = PodMoveOptions(pod_id=pod_id, source=nodes.a.endpoint, target=nodes.b.endpoint, work_dir=work_dir)
    with nodes.a.client() as source, nodes.b.client() as target:
        real_start, started = target.start, []

        def start_once(cid):
            if started:
                raise grpc.RpcError("injected: the target cannot start a second container")
            started.append(cid)
            real_start(cid)
        target.start = start_once
        with pytest.raises(MoveError) as err:
            PodMigration(options, source, target, say=lambda line: None).run()
    assert "rolled back: pod restored on" in str(err.value), err.value
    assert pods(nodes.b) == [] and containers(nodes.b) == []
    (back,) = pods(nodes.a)
    assert back.id != pod_id and {c.state for c in containers(nodes.a)} == {cri.CONTAINER_RUNNING}
    with nodes.a.client() as c:
        assert c.pod_status(back.id).status.network.ip == ip
        before = {name: len(ticks(shared / f"{name}-ticks")) for name in ("server", "client")}
        wait_for(lambda: all(len(ticks(shared / f"{n}-ticks")) > before[n] + 3 for n in before),
                 "the pod restored on the source makes no progress")
        for name in ("server", "client"):
            # The source counted 0..N and stopped at the cut; the target's copy that was started may have
            # counted on from N+1 before it was killed; the pod restored on the source counts on from
            # N+1 again: the values drop back once, to a point the first run had reached, and no more.
            values = ticks(shared / f"{name}-ticks")
            drops = [i for i in range(1, len(values)) if values[i] <= values[i - 1]]
            first, tail = values[:drops[0]] if drops else values, values[drops[-1]:] if drops else []
            assert len(drops) <= 1, f"{name}: more than one jump back: {values}"
            assert_consecutive(first)
            if tail:
                assert_consecutive(tail)
                assert tail[0] <= first[-1] + 1, f"{name}: the restored pod skipped values: {values}"
    assert list(work_dir.iterdir()) == [], "the journal or the checkpoint was left in the work dir"
