"""Two pyshim nodes on one machine, for migration tests: each node a network namespace with its own daemon.

    host netns:  bridge pysw<sfx> 10.97.X.1/24  (the "wire"; the registry listens here)
                   |-- veth pysw<sfx>a <-> wire0 in netns pynode-<sfx>-a  10.97.X.2/24, pods 10.98.X.0/24
                   '-- veth pysw<sfx>b <-> wire0 in netns pynode-<sfx>-b  10.97.X.3/24, pods 10.99.X.0/24

Each node netns forwards IPv4 (a per-netns sysctl; the host's is never touched) and routes the other
node's pod subnet via the other node's wire address, so a process in node B's netns (the node's
"host") reaches a pod on node A at its pod IP, as in a cluster with routed pod CIDRs.

The daemons run with `nsenter --net=/run/netns/NODE` in front: only the network namespace changes
(`ip netns exec` would also remount /sys, and runc would no longer see the cgroup mounts). Their
sockets, roots, state dirs and cgroup parents are on the host file system as for any test daemon.

    with two_nodes_up() as nodes:
        with nodes.a.client() as a:
            a.pull(nodes.busybox_ref)
        nodes.b.run(["ip", "route"])
"""
from __future__ import annotations

import contextlib
import ipaddress
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from integration.daemon import (Daemon, DaemonSettings, keep_daemon_log, leftovers, remove_cgroup_tree,
                                remove_everything)
from integration.registry_server import RegistryServer
from pyshim.client import Client

NSENTER = "nsenter"
WIRE_IFNAME = "wire0"  # the node's end of its veth, inside the node netns

# A Python TCP client, run inside a node netns: connect, send argv[3], half-close, print what comes back.
TCP_CLIENT = r"""
import socket, sys
host, port, data, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
with socket.create_connection((host, port), timeout=timeout) as s:
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    chunks = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
sys.stdout.buffer.write(b"".join(chunks))
"""


# A long-lived line client, run inside a node netns: one connection, kept open. For each line on stdin
# it sends the line and prints the line that comes back; on any failure it prints "ERROR <what>" and
# exits (so a reset connection shows as "ERROR ConnectionResetError...", never as a silent reconnect).
LINE_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
f = s.makefile("rwb")
print("CONNECTED %s:%d" % s.getsockname(), flush=True)
for line in sys.stdin:
    try:
        f.write(line.encode()); f.flush()
        answer = f.readline()
        if not answer:
            print("ERROR closed by peer", flush=True); break
        print(answer.decode().rstrip("\n"), flush=True)
    except OSError as exc:
        print("ERROR %s: %s" % (type(exc).__name__, exc), flush=True); break
"""


class LineClient:
    """One TCP connection from a node's netns to an echo-like server, kept open across calls.

        with nodes.b.line_client(pod_ip, 7000) as conn:
            assert conn.ask("ping 1") == "ping 1"
            ...                                  # checkpoint / move / restart meanwhile
            assert conn.ask("ping 2") == "ping 2"  # or starts with "ERROR" once reset
    """

    def __init__(self, node: "Node", ip: str, port: int, timeout: float = 10):
        self.proc = node.popen([sys.executable, "-u", "-c", LINE_CLIENT, ip, str(port), str(timeout)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, bufsize=1)
        first = self.proc.stdout.readline().strip()
        if not first.startswith("CONNECTED "):
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            self.close()
            raise RuntimeError(f"[node {node.name}] connecting to {ip}:{port}: {first or err.strip()}")
        self.local_address = first.split()[1]  # "IP:PORT" of the client side

    def ask(self, line: str) -> str:
        """Send one line, return the answer line, or "ERROR ..." if the connection failed."""
        if self.proc.poll() is not None:
            return "ERROR client exited"
        self.proc.stdin.write(line.rstrip("\n") + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().rstrip("\n") or "ERROR client exited"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()

    def __enter__(self) -> "LineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _used_wire_octets() -> set[int]:
    """Third octets of 10.97.X.0/24 already on this host (another test session's wire)."""
    out = _ip("-4", "-o", "addr", "show").stdout
    used = set()
    for word in out.split():
        if word.startswith("10.97."):
            used.add(int(word.split(".")[2]))
    return used


@dataclass
class Node:
    """One test node: a network namespace joined to the wire, with a pyshim daemon inside."""
    name: str                        # "a" or "b"
    netns: str                       # name under /run/netns
    wire_ip: str                     # the node's address on the wire, e.g. "10.97.7.2"
    pod_subnet: str                  # e.g. "10.98.7.0/24"
    host_veth: str                   # the veth end in the host netns, a port of the wire bridge
    daemon: Daemon | None = None

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.netns

    @property
    def endpoint(self) -> str:
        """The daemon's CRI endpoint, as `pyshim --endpoint` or crictl take it."""
        return f"unix://{self.daemon.settings.socket}"

    @property
    def settings(self) -> DaemonSettings:
        return self.daemon.settings

    def client(self, timeout: float = 120) -> Client:
        return self.daemon.client(timeout=timeout)

    def nsenter(self) -> list[str]:
        """The command prefix that runs a program in this node's network namespace."""
        return [NSENTER, f"--net={self.netns_path}", "--"]

    def run(self, argv: list[str], check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        """Run argv in this node's netns (the node "host"); text output captured."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        proc = subprocess.run([*self.nsenter(), *argv], timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"[node {self.name}] {' '.join(argv)} exited {proc.returncode}: "
                               f"{proc.stderr if isinstance(proc.stderr, str) else proc.stderr!r}")
        return proc

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start argv in this node's netns and return at once (e.g. a long-lived client)."""
        return subprocess.Popen([*self.nsenter(), *argv], **kwargs)

    def python(self, script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """Run a Python script (this interpreter) in this node's netns."""
        return self.run([sys.executable, "-c", script, *args], **kwargs)

    def tcp_exchange(self, ip: str, port: int, data: bytes | str = b"hello\n", timeout: float = 5,
                     retry_for: float = 10) -> bytes:
        """From this node's netns: connect to ip:port, send data, half-close, return all the answer.

        Retries connection failures for `retry_for` seconds (a listener may still be starting)."""
        data = data.decode() if isinstance(data, bytes) else data
        deadline = time.monotonic() + retry_for
        while True:
            proc = self.run([sys.executable, "-c", TCP_CLIENT, ip, str(port), data, str(timeout)],
                            check=False, text=False, timeout=timeout + 30)
            if proc.returncode == 0 or time.monotonic() > deadline:
                if proc.returncode != 0:
                    raise RuntimeError(f"[node {self.name}] TCP {ip}:{port} failed: "
                                       f"{proc.stderr.decode(errors='replace').strip()}")
                return proc.stdout
            time.sleep(0.2)

    def line_client(self, ip: str, port: int, timeout: float = 10) -> LineClient:
        """A kept-open TCP connection from this node's netns (see LineClient)."""
        return LineClient(self, ip, port, timeout)


@dataclass
class TwoNodes:
    a: Node
    b: Node
    registry: RegistryServer
    busybox_ref: str                 # the busybox test image on `registry`, e.g. "10.97.7.1:PORT/busybox:latest"
    wire_bridge: str                 # the bridge in the host netns
    wire_subnet: str                 # e.g. "10.97.7.0/24"
    wire_gateway: str                # the bridge's (host's) address on the wire, where the registry listens

    @property
    def nodes(self) -> tuple[Node, Node]:
        return self.a, self.b

    def other(self, node: Node) -> Node:
        return self.b if node is self.a else self.a

    def remove_everything(self) -> dict[str, tuple[list, list]]:
        """Remove every pod and container on both nodes; returns what each had ({"a": (pods, ctrs)})."""
        found = {}
        for node in self.nodes:
            with node.client() as c:
                found[node.name] = remove_everything(c)
        return found

    def leftovers(self) -> list[str]:
        """What the daemons left on the machine (mounts, runc containers, pod netns, conmon)."""
        return [f"node {n.name}: {item}" for n in self.nodes for item in leftovers(n.settings)]


def _new_node_settings(name: str, suffix: str, subnet: str, netns: str, registry: str) -> DaemonSettings:
    base = Path(tempfile.mkdtemp(prefix=f"pyshim-n{name}-", dir="/tmp"))
    # Pod netns and the cgroup parent are on the host and must be unique across daemons and sessions;
    # the daemon's CNI bridge lives in the node netns.
    return DaemonSettings(base=base, bridge=f"pynb{suffix}{name}", subnet=subnet,
                          netns_prefix=f"pyn{suffix}{name}-", insecure_registries=(registry,),
                          command_prefix=(NSENTER, f"--net=/run/netns/{netns}", "--"))


def _plumb(node: Node, bridge: str, prefixlen: int) -> None:
    _ip("netns", "add", node.netns)
    _ip("link", "add", node.host_veth, "type", "veth", "peer", "name", WIRE_IFNAME, "netns", node.netns)
    _ip("link", "set", node.host_veth, "master", bridge, "up")
    ns = ["-n", node.netns]
    _ip(*ns, "link", "set", "lo", "up")
    _ip(*ns, "addr", "add", f"{node.wire_ip}/{prefixlen}", "dev", WIRE_IFNAME)
    _ip(*ns, "link", "set", WIRE_IFNAME, "up")
    # The node routes between the wire and its pods; a per-netns sysctl, the host's stays as it is.
    node.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])


def _teardown(nodes: list[Node], bridge: str, settings: list[DaemonSettings]) -> list[str]:
    """Stop daemons, check and remove what they made, then the plumbing; returns what was left."""
    found: list[str] = []
    for node in nodes:
        if node.daemon is None:
            continue
        try:
            if node.daemon.process and node.daemon.process.poll() is None:
                with node.client(timeout=60) as c:
                    remove_everything(c)
        except Exception as exc:  # noqa: BLE001 - report, and go on cleaning
            found.append(f"node {node.name}: removing pods failed: {exc}")
        node.daemon.stop()
        found += [f"node {node.name}: {item}" for item in leftovers(node.settings)]
    for s in settings:
        keep_daemon_log(s)
        found += [f"cgroup {c}" for c in remove_cgroup_tree(s.cgroup_parent)]
        subprocess.run(["rm", "-rf", str(s.base)], capture_output=True)
    for node in nodes:
        _ip("link", "del", node.host_veth, check=False)
        _ip("netns", "del", node.netns, check=False)
    _ip("link", "del", bridge, check=False)
    # Verify the plumbing is gone too.
    for node in nodes:
        if node.netns_path.exists():
            found.append(f"netns {node.netns}")
        if _ip("link", "show", node.host_veth, check=False).returncode == 0:
            found.append(f"veth {node.host_veth}")
    if _ip("link", "show", bridge, check=False).returncode == 0:
        found.append(f"bridge {bridge}")
    return found


@contextlib.contextmanager
def two_nodes_up(push_busybox: bool = True):
    """Build the wire, two node netns with routes, a registry on the wire and a daemon per node.

    Yields a TwoNodes; on exit removes everything and raises AssertionError naming what was left."""
    from integration.testimage import push_busybox as push

    suffix = uuid.uuid4().hex[:4]
    used = _used_wire_octets()
    octet = random.choice([x for x in range(1, 255) if x not in used])
    wire = ipaddress.ip_network(f"10.97.{octet}.0/24")
    gateway = str(wire[1])
    bridge = f"pysw{suffix}"
    a = Node("a", f"pynode-{suffix}-a", str(wire[2]), f"10.98.{octet}.0/24", f"pysw{suffix}a")
    b = Node("b", f"pynode-{suffix}-b", str(wire[3]), f"10.99.{octet}.0/24", f"pysw{suffix}b")
    nodes = [a, b]
    settings: list[DaemonSettings] = []
    registry = None
    failure: BaseException | None = None
    found: list[str] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{gateway}/{wire.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for node in nodes:
            _plumb(node, bridge, wire.prefixlen)
        for node in nodes:
            peer = b if node is a else a
            _ip("-n", node.netns, "route", "add", peer.pod_subnet, "via", peer.wire_ip)

        registry = RegistryServer(host=gateway)
        registry.start()
        busybox_ref = push(registry.address) if push_busybox else ""
        for node in nodes:
            s = _new_node_settings(node.name, suffix, node.pod_subnet, node.netns, registry.address)
            settings.append(s)
            node.daemon = Daemon(s)
            node.daemon.start()
        yield TwoNodes(a, b, registry, busybox_ref, bridge, str(wire), gateway)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        try:
            found = _teardown(nodes, bridge, settings)
        finally:
            if registry is not None:
                registry.stop()
        if found and failure is None:
            raise AssertionError(f"the two nodes left these behind: {found}")
