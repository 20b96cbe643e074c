"""Benchmark of the streaming calls against bare runc and a direct connection, measured in the same run.

Prints: the median round trip of an exec of `true` over 50 runs for ExecSync, for streaming Exec (the
Exec call, the SPDY upgrade, the streams, the exit Status) and for bare `runc exec` of the same process
spec; and the throughput of a 256 MiB transfer from the pod through PortForward (SPDY) next to a direct
TCP connection to the pod's IP. Targets: streaming exec under 2x bare runc exec; port-forward at least
50% of the direct throughput. Figures only, nothing is asserted.

Run as root: `make bench-streaming` (or `python -m bench.streaming --runs 50 --mib 256`).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time

from cri_api import api_pb2 as cri
from integration.conftest import container_config, discard, new_settings, pod_config
from integration.daemon import Daemon, leftovers
from integration.registry_server import RegistryServer
from integration.testimage import push_busybox
from pyshim.streaming.client import PortForwardSession, RemoteCommand, exit_code

PORT = 9000


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _median_of(runs: int, action) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        action()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _drain(recv) -> int:
    total = 0
    while chunk := recv():
        total += len(chunk)
    return total


def bench_exec(client, daemon: Daemon, cid: str, runs: int) -> dict[str, float]:
    def exec_sync():
        assert client.exec_sync(cid, ["true"]).exit_code == 0

    def streaming():
        url = client.runtime.Exec(cri.ExecRequest(container_id=cid, cmd=["true"], stdout=True, stderr=True),
                                  timeout=30).url
        assert exit_code(RemoteCommand(url, "spdy").wait()) == 0

    spec = json.loads((daemon.settings.root / "containers" / cid / "config.json").read_text())
    runc_root = str(daemon.settings.state_dir / "runc")
    with tempfile.NamedTemporaryFile("w", suffix=".json") as process:
        json.dump(dict(spec["process"], args=["true"], terminal=False), process)
        process.flush()

        def bare():
            subprocess.run(["runc", "--root", runc_root, "exec", "--process", process.name, cid], check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

        for warm in (exec_sync, streaming, bare):
            warm()
        # Interleave the three so that drift of the machine hits them alike.
        results = {"ExecSync": [], "streaming Exec (SPDY)": [], "bare runc exec": []}
        for _ in range(runs):
            for name, action in zip(results, (exec_sync, streaming, bare)):
                t = time.perf_counter()
                action()
                results[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in results.items()}


def bench_port_forward(client, pod_id: str, ip: str, mib: int, runs: int) -> dict[str, float]:
    expected = mib << 20
    rates = {"port-forward (SPDY)": [], "direct to pod IP": []}
    for _ in range(runs):
        url = client.runtime.PortForward(cri.PortForwardRequest(pod_sandbox_id=pod_id, port=[PORT]), timeout=30).url
        session = PortForwardSession(url)
        try:
            t = time.perf_counter()
            conn = session.connect(PORT)
            got = _drain(conn.recv)
            rates["port-forward (SPDY)"].append(got / (time.perf_counter() - t))
            assert got == expected, (got, expected, conn.error(1))
        finally:
            session.close()
        t = time.perf_counter()
        with socket.create_connection((ip, PORT)) as s:
            got = _drain(lambda: s.recv(256 * 1024))
        rates["direct to pod IP"].append(got / (time.perf_counter() - t))
        assert got == expected, (got, expected)
    return {name: statistics.median(v) for name, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="exec round trips per kind")
    parser.add_argument("--mib", type=int, default=256, help="size of the port-forward transfer")
    parser.add_argument("--transfers", type=int, default=3, help="transfers per path (median)")
    args = parser.parse_args()
    settings = new_settings("sbench", "10.86.51.0/24")
    daemon = Daemon(settings)
    found: list[str] = []
    with RegistryServer() as registry:
        image = push_busybox(registry.address)
        daemon.start()
        try:
            with daemon.client(timeout=120) as client:
                client.pull(image)
                pod = pod_config(name="stream-bench")
                pod_id = client.run_pod(pod)
                try:
                    server = f"nc -ll -p {PORT} -e dd if=/dev/zero bs=1048576 count={args.mib} 2>/dev/null"
                    cid = client.create(pod_id, container_config(image, ["sh", "-c", server]), pod)
                    client.start(cid)
                    ip = client.pod_status(pod_id).status.network.ip
                    deadline = time.monotonic() + 10
                    while f":{PORT} " not in client.exec_sync(cid, ["netstat", "-ltn"]).stdout.decode():
                        assert time.monotonic() < deadline, "the pod's server did not listen"
                        time.sleep(0.1)
                    exec_times = bench_exec(client, daemon, cid, args.runs)
                    rates = bench_port_forward(client, pod_id, ip, args.mib, args.transfers)
                except Exception:
                    print(f"daemon log ({daemon.log_path}):\n{daemon.log_tail(60)}")
                    raise
                finally:
                    client.stop_pod(pod_id)
                    client.remove_pod(pod_id)
        finally:
            daemon.stop()
            found = leftovers(settings)
            discard(settings)
    bare = exec_times["bare runc exec"]
    print(f"exec of `true`, median of {args.runs}:")
    for name, value in exec_times.items():
        print(f"  {name:<24}{_ms(value):>10}   {value / bare:.2f}x bare runc exec")
    print(f"  target: streaming Exec < 2x bare runc exec -> "
          f"{'met' if exec_times['streaming Exec (SPDY)'] < 2 * bare else 'NOT met'}")
    direct = rates["direct to pod IP"]
    print(f"\n{args.mib} MiB from the pod, median of {args.transfers}:")
    for name, value in rates.items():
        print(f"  {name:<24}{value / 2**20:>8.0f} MiB/s   {value / direct * 100:.0f}% of direct")
    print(f"  target: port-forward >= 50% of direct -> "
          f"{'met' if rates['port-forward (SPDY)'] >= 0.5 * direct else 'NOT met'}")
    print(f"\nload average (1 min) {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; left behind: {found or 'nothing'}")


if __name__ == "__main__":
    main()
