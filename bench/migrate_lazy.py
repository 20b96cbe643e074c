"""Benchmark of `pyshim migrate --lazy` (issue 15, "Performance"): post-copy vs eager, both `--direct`,
in the same run on the same two netns nodes (integration.nodes.two_nodes_up), as `make bench-migrate
ARGS=--lazy` runs it.

For each size (256 MiB and 1 GiB of touched memory: bench/restore.py's HOLD, a busybox `sort` holding
SIZE bytes) a pod on node A runs the holder and an echo service (`nc -ll -p 7000 -e cat`). A client in
node B's network namespace (outside both pods) asks it every ~10 ms over a new TCP connection, first at
A's pod address, then also at the target pod's once the bench sees it on B, and records each answer.
Per run, alternating which goes first, the same kind of container is moved eagerly (`migrate --direct`)
and lazily (`migrate --lazy --direct`). Figures:

- downtime: lazy, from the instant the source was frozen (the report's frozen_at_unix) to the first
  answer from the target; eager, the report's downtime (frozen on A -> StartContainer returned on B) and
  the same frozen -> first answer as for lazy, when the client saw it;
- pages: lazy, from frozen to the target's last page (frozen->running + the target's lazyPagesMs);
- gap: the client's longest time between two answers, across the whole move.

Targets (issue 15): lazy downtime < 1 s at 1 GiB and < 300 ms at 256 MiB. Nothing is asserted.
Needs fs.pipe-max-size >= 4 MiB without CAP_SYS_RESOURCE: raised for the run and put back after.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench import lazy_floor
from bench.restore import HOLD, MIB, _median, _settle, _table, wait_for_holder
from cri_api import api_pb2 as cri
from integration.conftest import container_config, pod_config
from integration.nodes import TwoNodes, two_nodes_up
from criu_glue.lazy_pages import PageServer
from pyshim.internal import host_caps
from pyshim.migration.lazy_move import PAGE_SERVER_PORTS

PORT = 7000
# The lazy restore's phases in the target daemon (restore.py's PhaseTimer marks), printed next to the floor.
RESTORE_PHASES = ("rootfs", "unpack", "spec", "lazy_pages_daemon", "runc_restore")
RELAY_PORT = 7913
SERVICE = f"({HOLD}) & exec nc -ll -p {PORT} -e /bin/cat"

# In node B's netns: ask every ~10 ms. The source is asked over ONE kept-open connection: a new connection
# per question would sit in the frozen listener's accept queue, and CRIU refuses to dump a listener with
# in-flight connections (pyshim does not pass --skip-in-flight; see the README). Once the bench writes the
# target pod's address on stdin, the target is asked over a new connection per question, and when it has
# answered the source is no longer asked. At "END" it prints the answers' wall-clock times as JSON.
CLIENT = r"""
import json, select, socket, sys, time
port, answers, target = int(sys.argv[2]), [], ""
source = socket.create_connection((sys.argv[1], port), timeout=5)
pending, switched = False, False
print("ready", flush=True)
while True:
    if select.select([sys.stdin], [], [], 0)[0]:
        line = sys.stdin.readline().strip()
        if line in ("END", ""):
            break
        target = line
    if not switched and source is not None:
        try:
            if not pending:
                source.sendall(b"x\n")
                pending = True
            if select.select([source], [], [], 0.01)[0]:
                data = source.recv(64)
                if not data:
                    source = None
                else:
                    answers.append((time.time(), sys.argv[1]))
                    pending = False
        except OSError:
            source = None
    if target:
        try:
            with socket.create_connection((target, port), timeout=0.1) as s:
                s.settimeout(0.5)
                s.sendall(b"x\n")
                if s.recv(16).startswith(b"x"):
                    answers.append((time.time(), target))
                    switched = True
        except OSError:
            pass
    time.sleep(0.01)
print(json.dumps(answers), flush=True)
"""


@dataclass
class Run:
    report: dict
    answers: list  # (unix time, ip)
    target_ip: str

    def first_target_answer(self) -> float:
        return next((t for t, ip in self.answers if ip == self.target_ip), 0.0)

    def frozen_to_first_answer_ms(self) -> float:
        first, frozen = self.first_target_answer(), self.report.get("frozen_at_unix", 0.0)
        return round((first - frozen) * 1000, 1) if first and frozen else float("nan")

    def longest_gap_ms(self) -> float:
        times = [t for t, _ in self.answers]
        return round(max((b - a for a, b in zip(times, times[1:])), default=float("nan")) * 1000, 1)


@dataclass
class Row:
    size_mib: int
    lazy: list = field(default_factory=list)
    eager: list = field(default_factory=list)
    floors: list = field(default_factory=list)  # bench.lazy_floor.Floor per run: bare runc + CRIU, A -> B


class LazyBench:
    def __init__(self, nodes: TwoNodes, work: Path):
        self.nodes = nodes
        self.work = work
        self.a = nodes.a.client(timeout=1200)
        self.b = nodes.b.client(timeout=1200)
        self.a.pull(nodes.busybox_ref)
        self.relay: subprocess.Popen | None = None

    def service(self, size_mib: int) -> tuple[str, str]:
        """A pod on A with the holder and the echo service; (container id, pod IP)."""
        name = f"lz-{size_mib}-{uuid.uuid4().hex[:4]}"
        pod = pod_config(name=name, log_directory=str(self.work / "logs" / name))
        pod_id = self.a.run_pod(pod)
        cid = self.a.create(pod_id, container_config(self.nodes.busybox_ref, ["sh", "-c", SERVICE.format(
            size=size_mib * MIB)], name="svc", log_path="svc.log"), pod)
        self.a.start(cid)
        spec = json.loads((self.nodes.a.settings.root / "containers" / cid / "config.json").read_text())
        wait_for_holder(spec["linux"]["cgroupsPath"], size_mib)
        return cid, self.a.pod_status(pod_id).status.network.ip

    def move(self, size_mib: int, lazy: bool) -> Run:
        cid, ip = self.service(size_mib)
        client = self.nodes.b.popen([sys.executable, "-u", "-c", CLIENT, ip, str(PORT)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # a few answers from the source first
        target_ip: list[str] = []
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch_target_pod, args=(client, target_ip, stop), daemon=True)
        watcher.start()
        _settle()
        extra = ["--lazy", "--page-server", self.nodes.a.wire_ip] if lazy else ["--verify-seconds", "0.5"]
        proc = subprocess.run([sys.executable, "-m", "pyshim", "migrate", cid, "--from", self.nodes.a.endpoint,
                               "--to", self.nodes.b.endpoint, "--direct", self.direct_command(), "--work-dir",
                               str(self.work / "migrate"), "--json", *extra],
                              capture_output=True, text=True, timeout=1800)
        time.sleep(1.0)  # answers from the target after the move
        stop.set()
        watcher.join()
        client.stdin.write("END\n")
        client.stdin.flush()
        answers = json.loads(client.stdout.readline())
        client.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"pyshim migrate exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        report = json.loads(proc.stdout)
        self.b.stop_pod(report["target_pod"])
        self.b.remove_pod(report["target_pod"])
        self.b.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=report["image"])), timeout=600)
        return Run(report, answers, target_ip[0] if target_ip else "")

    def floor(self, size_mib: int) -> lazy_floor.Floor:
        """Bare `runc checkpoint --lazy-pages` on A of a holder of the same size, bare `criu lazy-pages` and
        `runc restore --lazy-pages` from B's netns pulling from its page server (a holder alone: the service's
        listener would be restored beside its frozen self in the same netns)."""
        name = f"fl-{size_mib}-{uuid.uuid4().hex[:4]}"
        pod = pod_config(name=name, log_directory=str(self.work / "logs" / name))
        pod_id = self.a.run_pod(pod)
        try:
            cid = self.a.create(pod_id, container_config(self.nodes.busybox_ref, ["sh", "-c", HOLD.format(
                size=size_mib * MIB)], name="hold", log_path="hold.log"), pod)
            self.a.start(cid)
            spec = json.loads((self.nodes.a.settings.root / "containers" / cid / "config.json").read_text())
            wait_for_holder(spec["linux"]["cgroupsPath"], size_mib)
            _settle()
            return lazy_floor.measure(self.nodes.a.settings.state_dir / "runc", cid, self.work / "floor",
                                      PageServer(self.nodes.a.wire_ip, random.randint(*PAGE_SERVER_PORTS)),
                                      source_prefix=tuple(self.nodes.a.nsenter()),
                                      target_prefix=tuple(self.nodes.b.nsenter()))
        finally:
            self.a.stop_pod(pod_id)
            self.a.remove_pod(pod_id)

    def _watch_target_pod(self, client: subprocess.Popen, found: list, stop: threading.Event) -> None:
        """Tell the client the target pod's address as soon as the pod exists on B."""
        while not stop.is_set() and not found:
            for item in self.b.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items:
                ip = self.b.pod_status(item.id).status.network.ip
                if ip:
                    found.append(ip)
                    client.stdin.write(ip + "\n")
                    client.stdin.flush()
                    return
            time.sleep(0.005)

    def direct_command(self) -> str:
        b = self.nodes.b
        if self.relay is None:
            self.relay = b.popen([sys.executable, "-u", "-m", "bench.direct_relay", "serve", b.wire_ip,
                                  str(RELAY_PORT), "--", sys.executable, "-m", "pyshim", "checkpoint-image", "receive",
                                  "--config", str(b.settings.config_file), "--root", str(b.settings.root)],
                                 stdout=subprocess.PIPE, text=True)
            if self.relay.stdout.readline().strip() != "listening":
                raise RuntimeError("the direct relay in node B's netns did not start")
        return f"{sys.executable} -m bench.direct_relay send {b.wire_ip} {RELAY_PORT}"

    def close(self) -> None:
        if self.relay is not None:
            self.relay.kill()
            self.relay.wait()
            self.relay.stdout.close()
        self.a.close()
        self.b.close()


def report(rows: list[Row], runs: int) -> str:
    out = [f"pyshim migrate --lazy vs eager, both --direct, median of {runs} runs (ms); client in node B's netns",
           "downtime = frozen on A -> first answer from B; eager start = frozen -> StartContainer returned on B"]
    table, verdicts = [], []
    for r in rows:
        lazy_down = _median([x.frozen_to_first_answer_ms() for x in r.lazy])
        start = _median([x.report["downtime_ms"] for x in r.lazy])
        pages = _median([x.report["downtime_ms"] + (x.report["lazy_pages"].get("lazyPagesMs") or 0) for x in r.lazy])
        gap = _median([x.longest_gap_ms() for x in r.lazy])
        eager_start = _median([x.report["downtime_ms"] for x in r.eager])
        eager_gap = _median([x.longest_gap_ms() for x in r.eager])
        table.append([f"{r.size_mib}", f"{lazy_down:.0f}", f"{start:.0f}", f"{pages:.0f}", f"{gap:.0f}",
                      f"{eager_start:.0f}", f"{eager_gap:.0f}"])
        target = 1000 if r.size_mib >= 1024 else 300
        verdicts.append(f"{r.size_mib} MiB: lazy downtime {lazy_down:.0f} ms vs target < {target} ms -> "
                        f"{'MET' if lazy_down < target else 'NOT MET'} (eager {eager_start:.0f} ms)")
    out.append(_table(["MiB", "lazy downtime", "lazy start", "lazy all pages", "lazy gap", "eager start",
                       "eager gap"], table))
    out.append("")
    out.append("Per run (ms): lazy downtime/start/all pages/gap | eager start/gap; lazy source phases")
    for r in rows:
        for lz, eg in zip(r.lazy, r.eager):
            out.append(f"  {r.size_mib:>5} MiB: {lz.frozen_to_first_answer_ms():.0f}/{lz.report['downtime_ms']:.0f}/"
                       f"{lz.report['downtime_ms'] + (lz.report['lazy_pages'].get('lazyPagesMs') or 0):.0f}/"
                       f"{lz.longest_gap_ms():.0f} | {eg.report['downtime_ms']:.0f}/{eg.longest_gap_ms():.0f}; "
                       f"{lz.report['checkpoint_phases_ms']} client {lz.report['phases_ms']} target restore "
                       f"{lz.report.get('restore_phases_ms')} receiver {lz.report.get('receive_phases_ms')}")
    out.append("")
    out.append("Floors, same run (bare runc + CRIU on a holder of the same size, A -> B, ms, medians) next to pyshim's "
               "lazy move:")
    for r in rows:
        def med(key: str, source: str = "checkpoint_phases_ms", runs=r.lazy) -> float:
            return _median([x.report[source].get(key, float("nan")) for x in runs])
        out.append(f"  {r.size_mib:>5} MiB: bare lazy dump {_median([f.dump_ms for f in r.floors]):.0f} | pyshim pause "
                   f"{med('pause'):.0f} + dump {med('dump'):.0f}, CheckpointContainer call "
                   f"{med('checkpoint', 'phases_ms'):.0f}")
        lp, rr = _median([f.lazy_pages_ms for f in r.floors]), _median([f.restore_ms for f in r.floors])
        target = ", ".join(f"{k} {med(k, 'restore_phases_ms'):.0f}" for k in RESTORE_PHASES)
        out.append(f"  {r.size_mib:>5} MiB: bare lazy-pages start {lp:.0f} + runc restore {rr:.0f} = {lp + rr:.0f} | "
                   f"pyshim StartContainer {med('start', 'phases_ms'):.0f} (in B's daemon: {target})")
    out.append("")
    out.append("Targets (issue 15: lazy downtime < 1 s at 1 GiB, < 300 ms at 256 MiB)")
    out.extend(f"  {v}" for v in verdicts)
    return "\n".join(out)


def main(sizes: list[int], runs: int) -> None:
    rows = [Row(n) for n in sizes]
    load_before = os.getloadavg()[0]
    raised_from = 0
    if host_caps.lazy_page_server_problem():
        raised_from = host_caps.pipe_max_size()
        Path(host_caps.PIPE_MAX_SIZE_SYSCTL).write_text(str(host_caps.LAZY_PAGE_SERVER_PIPE_BYTES))
    work = Path(tempfile.mkdtemp(prefix="pyshim-lzmigbench-", dir="/tmp"))
    (work / "migrate").mkdir(mode=0o700)
    try:
        with two_nodes_up() as nodes:
            bench = LazyBench(nodes, work)
            try:
                for row in rows:
                    for i in range(runs):
                        order = (True, False) if i % 2 == 0 else (False, True)
                        for lazy in order:
                            (row.lazy if lazy else row.eager).append(bench.move(row.size_mib, lazy))
                        try:
                            row.floors.append(bench.floor(row.size_mib))
                        except (RuntimeError, subprocess.SubprocessError) as e:  # the pyshim figures stand
                            print(f"  bare floor failed: {e}", file=sys.stderr, flush=True)
                        lz, eg = row.lazy[-1], row.eager[-1]
                        print(f"  {row.size_mib} MiB run {i + 1}: lazy downtime {lz.frozen_to_first_answer_ms():.0f} "
                              f"ms (gap {lz.longest_gap_ms():.0f}), eager {eg.report['downtime_ms']:.0f} ms "
                              f"(gap {eg.longest_gap_ms():.0f}); bare floor: {row.floors[-1] if row.floors else '-'}",
                              file=sys.stderr, flush=True)
            except BaseException:
                for node in nodes.nodes:
                    print(f"daemon log of node {node.name}:\n{node.daemon.log_tail(30)}", file=sys.stderr)
                raise
            finally:
                bench.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if raised_from:
            Path(host_caps.PIPE_MAX_SIZE_SYSCTL).write_text(str(raised_from))
    print(report(rows, runs))
    print(f"\nload average (1 min) at start {load_before:.2f}, at end {os.getloadavg()[0]:.2f}, on {os.cpu_count()} "
          f"CPUs; fs.pipe-max-size {'raised to 4 MiB for the run, restored' if raised_from else 'left as it was'}")
