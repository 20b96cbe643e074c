"""Two nodes on one machine: each pulls from the registry on the wire, gets its own pod subnet, and
reaches the other node's pods by their pod IPs (routed, not NATed)."""
from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path

from cri_api import api_pb2 as cri
from integration.conftest import container_config, pod_config
from integration.nodes import two_nodes_up

ECHO = ["nc", "-ll", "-p", "7000", "-e", "/bin/cat"]


def run_pod(node, image, command, **kwargs):
    with node.client() as c:
        pod = pod_config()
        pod_id = c.run_pod(pod)
        cid = c.create(pod_id, container_config(image, command, **kwargs), pod)
        c.start(cid)
        ip = c.pod_status(pod_id).status.network.ip
    return pod_id, cid, ip


def remove_pod(node, pod_id):
    with node.client() as c:
        c.stop_pod(pod_id)
        c.remove_pod(pod_id)


def test_both_nodes_pull_from_the_registry_on_the_wire(two_nodes_clean):
    nodes = two_nodes_clean
    assert nodes.registry.address.startswith(nodes.wire_gateway + ":")
    for node in nodes.nodes:
        with node.client() as c:
            ref = c.pull(nodes.busybox_ref)
            assert ref.startswith("sha256:")
            images = c.images.ListImages(cri.ListImagesRequest()).images
            assert any(nodes.busybox_ref in i.repo_tags for i in images)
        # The daemon really runs in the node's network namespace.
        pid = node.daemon.process.pid
        assert Path(f"/proc/{pid}/ns/net").resolve() != Path("/proc/self/ns/net").resolve()
        assert Path(f"/proc/{pid}/ns/net").stat().st_ino == node.netns_path.stat().st_ino


def test_pods_get_their_nodes_subnet_and_reach_each_other_across_the_wire(two_nodes_clean):
    nodes = two_nodes_clean
    for node in nodes.nodes:
        with node.client() as c:
            c.pull(nodes.busybox_ref)
    pod_a, _, ip_a = run_pod(nodes.a, nodes.busybox_ref, ECHO)
    try:
        pod_b, cid_b, ip_b = run_pod(nodes.b, nodes.busybox_ref, ["sleep", "300"])
        try:
            assert ipaddress.ip_address(ip_a) in ipaddress.ip_network(nodes.a.pod_subnet)
            assert ipaddress.ip_address(ip_b) in ipaddress.ip_network(nodes.b.pod_subnet)

            # Node B's host talks to the echo pod on node A at its pod IP.
            assert nodes.b.tcp_exchange(ip_a, 7000, b"across the wire\n") == b"across the wire\n"
            # So does a pod on node B (its traffic leaves through B's bridge and wire, routed by A).
            with nodes.b.client() as c:
                out = c.exec_sync(cid_b, ["sh", "-c", f"echo from-pod-b | timeout 5 nc {ip_a} 7000"], timeout=10)
            assert out.stdout == b"from-pod-b\n", out.stderr
            # Node A's own host reaches it too.
            assert nodes.a.tcp_exchange(ip_a, 7000, b"local\n") == b"local\n"
        finally:
            remove_pod(nodes.b, pod_b)
    finally:
        remove_pod(nodes.a, pod_a)


def test_a_kept_open_connection_from_node_b_to_a_pod_on_node_a(two_nodes_clean):
    """The shape of the migration checks: one connection from B's host to a pod on A, asked again and
    again; the pod sees B's wire address as the peer (routed, no NAT)."""
    nodes = two_nodes_clean
    with nodes.a.client() as c:
        c.pull(nodes.busybox_ref)
    pod_a, cid_a, ip_a = run_pod(nodes.a, nodes.busybox_ref, ECHO)
    try:
        nodes.b.tcp_exchange(ip_a, 7000, b"up?\n")  # waits for the listener
        with nodes.b.line_client(ip_a, 7000) as conn:
            assert conn.local_address.startswith(nodes.b.wire_ip + ":")
            for i in range(5):
                assert conn.ask(f"line {i}") == f"line {i}"
            with nodes.a.client() as c:
                peers = c.exec_sync(cid_a, ["netstat", "-tn"]).stdout.decode()
            # (busybox nc listens on IPv6 too: the peer may show as ::ffff:10.97.X.3)
            assert re.search(rf"[ :]{re.escape(conn.local_address)}\s+ESTABLISHED", peers), peers
            # The server side of this connection goes away: the client says so instead of hanging.
            with nodes.a.client() as c:
                c.exec_sync(cid_a, ["killall", "cat"])
            assert conn.ask("after").startswith("ERROR"), "a closed connection was not reported"
        assert conn.proc.returncode is not None
    finally:
        remove_pod(nodes.a, pod_a)


def test_the_host_netns_stays_apart_from_the_pod_subnets(two_nodes_clean):
    nodes = two_nodes_clean
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    assert nodes.a.pod_subnet.split("/")[0] not in routes and nodes.b.pod_subnet.split("/")[0] not in routes
    # Forwarding was switched on in the nodes only.
    for node in nodes.nodes:
        assert node.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"


def test_teardown_removes_everything():
    """A second, short-lived pair: after it is torn down no netns, link, daemon or cgroup remains."""
    with two_nodes_up(push_busybox=False) as nodes:
        names = [(n.netns, n.host_veth, n.settings) for n in nodes.nodes]
        bridge = nodes.wire_bridge
        pids = [n.daemon.process.pid for n in nodes.nodes]
        registry_dir = nodes.registry.workdir
        with nodes.a.client() as c:
            pod = pod_config()
            c.run_pod(pod)  # left for the teardown to remove
    for netns, veth, settings in names:
        assert not Path(f"/run/netns/{netns}").exists()
        assert subprocess.run(["ip", "link", "show", veth], capture_output=True).returncode != 0
        assert not settings.base.exists()
        rel = settings.cgroup_parent.strip("/")
        assert not list(Path("/sys/fs/cgroup").glob(f"*/{rel}")), "cgroup parent left"
        assert not [p for p in Path("/run/netns").iterdir() if p.name.startswith(settings.netns_prefix)]
    assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode != 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert registry_dir is None or not Path(registry_dir).exists()
