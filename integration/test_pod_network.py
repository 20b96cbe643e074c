"""Pod sandbox plumbing against the real kernel and the real CNI plugins.

Two pods on a throwaway bridge and subnet talk to each other; a host port reaches one
of them through portmap; detaching leaves no netns, iptables chain, bridge port or IP
allocation behind. Then a pod's namespaces (net + pinned IPC/UTS + PID infra) are
joined by a process the way runc would join them.

Host-port traffic is sent to 127.0.0.1: portmap DNATs it in nat/OUTPUT and, with its
default snat=true, masquerades it and sets route_localnet on the bridge so the
127.0.0.1 source may be routed off loopback. That way no test traffic goes to any
address outside this machine's loopback and the namespaces the test made.
"""
from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from pyshim.internal import netns, pod_namespaces
from pyshim.internal.cni import CNINetwork, CNIPluginError, PortMapping, default_conflist

PLUGIN_DIR = Path("/usr/lib/cni")
NETWORK_NAME = "pyshim-itest"
POD_PORT = 8080

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        not all((PLUGIN_DIR / p).exists() for p in ("bridge", "host-local", "portmap")) or not shutil.which("iptables"),
        reason="needs containernetworking-plugins and iptables",
    ),
]

# Runs inside a pod netns: answers every connection with the pod's name, and exits by
# itself after a while so nothing outlives a failed test.
ECHO_SERVER = """
import socket, sys, time
name, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port)); srv.listen(8); srv.settimeout(1)
print("listening", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        conn, peer = srv.accept()
    except socket.timeout:
        continue
    conn.sendall(f"{name} sees {peer[0]}\\n".encode()); conn.close()
"""

TCP_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    print(s.makefile().readline().strip())
"""


def nat_chains() -> set[str]:
    out = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True, check=True).stdout
    return {line.split()[1] for line in out.splitlines() if line.startswith("-N ")}


def nat_rules_mentioning(word: str) -> list[str]:
    out = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if word in line and not line.startswith("-N ")]


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.231.0.0/16 that no host route overlaps."""
    with IPRoute() as ipr:
        taken = [
            ipaddress.ip_network(f"{r.get('RTA_DST')}/{r['dst_len']}", strict=False)
            for r in ipr.get_routes(family=socket.AF_INET)
            if r.get("RTA_DST")
        ]
    for third in range(77, 255):
        candidate = ipaddress.ip_network(f"10.231.{third}.0/24")
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    pytest.skip("no free 10.231.x.0/24 subnet")


def free_host_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_netns(path: Path, script: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        ["nsenter", f"--net={path}", "--", sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


def connect_from_netns(path: Path, ip: str, port: int) -> str:
    deadline = time.monotonic() + 10
    while True:
        proc = in_netns(path, TCP_CLIENT, ip, str(port))
        out, err = proc.communicate(timeout=15)
        if proc.returncode == 0 or time.monotonic() > deadline:
            assert proc.returncode == 0, f"connect {ip}:{port} from {path} failed: {err}"
            return out.strip()
        time.sleep(0.2)


def bridge_ports(bridge: str) -> list[str]:
    with IPRoute() as ipr:
        indexes = ipr.link_lookup(ifname=bridge)
        if not indexes:
            return []
        return [link.get("IFLA_IFNAME") for link in ipr.get_links() if link.get("IFLA_MASTER") == indexes[0]]


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Lab:
    """A throwaway bridge/subnet network and the namespaces a test makes on it."""

    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix="pyshim-netit-", dir="/tmp"))
        self.bridge = f"pyshimtest{os.getpid() % 100000}"  # <= 15 chars, unique per run
        self.subnet = free_subnet()
        self.ipam_dir = self.base / "ipam"
        self.cache_dir = self.base / "cni-cache"
        self.conflist = default_conflist(NETWORK_NAME, self.bridge, str(self.subnet), self.ipam_dir)
        self.netns_names: list[str] = []
        self.chains_before = nat_chains()
        self.ip_forward_before = Path("/proc/sys/net/ipv4/ip_forward").read_text()

    def network(self, conflist: dict | None = None) -> CNINetwork:
        return CNINetwork(conflist or self.conflist, [PLUGIN_DIR], self.cache_dir)

    def new_netns(self) -> Path:
        name = f"pyshim-it-{uuid.uuid4().hex[:12]}"
        self.netns_names.append(name)
        return netns.create_netns(name)

    def allocated_ips(self) -> set[str]:
        """IPs host-local holds for this network (one file per IP)."""
        directory = self.ipam_dir / NETWORK_NAME
        if not directory.is_dir():
            return set()
        return {p.name for p in directory.iterdir() if _is_ip(p.name)}

    def close(self) -> None:
        network = self.network()
        for sandbox_id in network.cached_sandbox_ids():
            network.detach(sandbox_id, None)
        for name in self.netns_names:
            netns.remove_netns(name)
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=self.bridge):
                ipr.link("del", index=index)
        # The bridge plugin turns on forwarding host-wide for its gateway; put it back.
        Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward_before)
        _remove_portmap_top_chains_we_created(self.chains_before)
        shutil.rmtree(self.base, ignore_errors=True)


def _remove_portmap_top_chains_we_created(chains_before: set[str]) -> None:
    """portmap never deletes its shared top-level chains; remove those this test made."""
    ours = {c for c in nat_chains() - chains_before if c.startswith("CNI-HOSTPORT-")}
    if not ours:
        return
    for hook in ("PREROUTING", "OUTPUT", "POSTROUTING"):
        out = subprocess.run(["iptables", "-w", "-t", "nat", "-S", hook], capture_output=True, text=True).stdout
        for rule in out.splitlines():
            words = shlex.split(rule)
            if words[:1] == ["-A"] and words[-1] in ours:
                subprocess.run(["iptables", "-w", "-t", "nat", "-D", *words[1:]], check=True)
    for chain in ours:
        subprocess.run(["iptables", "-w", "-t", "nat", "-F", chain], check=True)
    for chain in ours:
        subprocess.run(["iptables", "-w", "-t", "nat", "-X", chain], check=True)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


@pytest.fixture
def lab():
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()
    assert not any(netns.netns_path(n).exists() for n in lab.netns_names)
    assert not {c for c in nat_chains() - lab.chains_before if c.startswith(("CNI-HOSTPORT-", "CNI-DN-"))}
    with IPRoute() as ipr:
        assert not ipr.link_lookup(ifname=lab.bridge)


def test_two_pods_talk_and_a_host_port_reaches_one_then_detach_leaves_nothing(lab):
    network = lab.network()
    assert network.ready() == (True, "")
    id_a, id_b = uuid.uuid4().hex, uuid.uuid4().hex
    ns_a, ns_b = lab.new_netns(), lab.new_netns()
    host_port = free_host_port()

    pod_a = network.attach(id_a, ns_a, "pod-a", "itest", "uid-a", [PortMapping(host_port, POD_PORT)])
    pod_b = network.attach(id_b, ns_b, "pod-b", "itest", "uid-b", [])

    # --- addresses ---
    for pod, path in ((pod_a, ns_a), (pod_b, ns_b)):
        assert ipaddress.ip_address(pod.ip) in lab.subnet
        assert pod.prefix_len == lab.subnet.prefixlen
        assert pod.gateway == str(lab.subnet[1])
        with IPRoute(netns=str(path)) as ipr:
            (eth0,) = ipr.get_links(ifname="eth0")
            assert eth0.get("IFLA_ADDRESS") == pod.mac
            assert pod.ip in [a.get("IFA_ADDRESS") for a in ipr.get_addr(index=eth0["index"])]
    assert pod_a.ip != pod_b.ip
    assert lab.allocated_ips() == {pod_a.ip, pod_b.ip}
    assert len(bridge_ports(lab.bridge)) == 2
    assert network.cached_attachment(id_a) == pod_a

    server = in_netns(ns_a, ECHO_SERVER, "pod-a", str(POD_PORT))
    try:
        assert server.stdout.readline().strip() == "listening"

        # --- pod to pod, across the bridge ---
        assert connect_from_netns(ns_b, pod_a.ip, POD_PORT) == f"pod-a sees {pod_b.ip}"

        # --- host port through portmap, from the host's loopback ---
        assert Path(f"/proc/sys/net/ipv4/conf/{lab.bridge}/route_localnet").read_text().strip() == "1"
        assert any(c.startswith("CNI-DN-") for c in nat_chains())
        with socket.create_connection(("127.0.0.1", host_port), timeout=5) as conn:
            reply = conn.makefile().readline().strip()
        # masqueraded to the bridge's gateway address, as portmap's snat does for localhost
        assert reply == f"pod-a sees {pod_a.gateway}"
    finally:
        server.kill()
        server.communicate()

    # --- detach: A from a "restarted daemon" (fresh object, same cache), B after its netns is gone ---
    lab.network().detach(id_a, ns_a, [])
    netns.remove_netns(lab.netns_names[1])
    network.detach(id_b, ns_b, [])
    netns.remove_netns(lab.netns_names[0])

    assert lab.allocated_ips() == set(), "IPs not released"
    assert not [c for c in nat_chains() if c.startswith("CNI-DN-")]
    assert nat_rules_mentioning("CNI-DN-") == []
    assert wait_until(lambda: bridge_ports(lab.bridge) == []), f"bridge ports left: {bridge_ports(lab.bridge)}"
    assert network.cached_sandbox_ids() == []
    with pytest.raises(socket.error):
        socket.create_connection(("127.0.0.1", host_port), timeout=1).close()

    # idempotent, even with nothing left at all
    network.detach(id_a, ns_a, [PortMapping(host_port, POD_PORT)])
    network.detach(id_b, None)


def test_failed_add_is_rolled_back_with_the_plugins_message(lab):
    conflist = default_conflist(NETWORK_NAME, lab.bridge, str(lab.subnet), lab.ipam_dir)
    # An iptables condition that does not exist makes portmap fail after bridge succeeded.
    conflist["plugins"][1]["conditionsV4"] = ["--no-such-iptables-option"]
    network = lab.network(conflist)
    ns = lab.new_netns()

    with pytest.raises(CNIPluginError) as info:
        network.attach(uuid.uuid4().hex, ns, "pod", "itest", "uid", [PortMapping(free_host_port(), 80)])

    assert info.value.plugin == "portmap"
    assert "no-such-iptables-option" in info.value.message, info.value.message
    assert lab.allocated_ips() == set(), "bridge's IP not released on rollback"
    with IPRoute(netns=str(ns)) as ipr:
        assert ipr.link_lookup(ifname="eth0") == [], "bridge's veth not removed on rollback"
    assert wait_until(lambda: bridge_ports(lab.bridge) == [])
    assert not [c for c in nat_chains() if c.startswith("CNI-DN-")]
    assert network.cached_sandbox_ids() == []


def test_a_process_joins_all_pod_namespaces_like_runc_would(lab, tmp_path):
    pins_dir = tmp_path / "pins"
    ns = lab.new_netns()
    member = None
    try:
        pins = pod_namespaces.pin_namespaces(pins_dir, "pod-host")
        infra = pod_namespaces.start_pid_infra(pins_dir)
        member = subprocess.Popen(
            ["nsenter", f"--net={ns}", f"--ipc={pins['ipc']}", f"--uts={pins['uts']}",
             f"--pid={pod_namespaces.pid_infra_ns_path(pins_dir)}", "--", "sleep", "30"],
        )  # fmt: skip
        # nsenter forks for --pid; the sleep is its child
        assert wait_until(lambda: _children(member.pid) != [])
        (sleeper,) = _children(member.pid)

        links = {kind: os.readlink(f"/proc/{sleeper}/ns/{kind}") for kind in ("net", "ipc", "uts", "pid")}
        assert links["net"] == f"net:[{os.stat(ns).st_ino}]"
        assert links["ipc"] == f"ipc:[{os.stat(pins['ipc']).st_ino}]"
        assert links["uts"] == f"uts:[{os.stat(pins['uts']).st_ino}]"
        assert links["pid"] == os.readlink(f"/proc/{infra.pid}/ns/pid")
        for kind, link in links.items():
            assert link != os.readlink(f"/proc/self/ns/{kind}"), f"{kind} is the host's"
        hostname = subprocess.run(
            ["nsenter", f"--uts={pins['uts']}", "hostname"], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert hostname == "pod-host"

        # Stopping the infra ends the pod's PID namespace and everything in it.
        pod_namespaces.stop_pid_infra(pins_dir)
        assert member.wait(timeout=5) != 0
        pod_namespaces.unpin_namespaces(pins_dir)
        assert not (pins_dir / "ipc").exists() and not (pins_dir / "uts").exists()
        assert not netns.is_ns_pin(pins["ipc"])
    finally:
        if member is not None and member.poll() is None:
            member.kill()
            member.wait()
        pod_namespaces.stop_pid_infra(pins_dir)
        pod_namespaces.unpin_namespaces(pins_dir)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []
