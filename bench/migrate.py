"""Benchmark of `pyshim migrate` (issue 5, "Performance"): downtime of a move from node A to node B
through the registry, next to the bare runc baseline measured in the same run on the same kind of container.

Setup: `integration.nodes.two_nodes_up()` -- two pyshim daemons, each in its own network namespace,
joined by a veth wire to a bridge in the host netns where a real docker-registry listens.

For each size (16/256/1024 MiB of touched memory: bench/restore.py's HOLD container, a busybox `sort`
holding SIZE bytes of lines), per run, alternating which side goes first:

- pyshim: a fresh pod + holder on A, then `python -m pyshim migrate CID --from A --to B --registry
  WIRE/bench --insecure --json` from the host netns, as a user runs it. Its report gives the downtime
  (runc pause on A to StartContainer returned on B) and the breakdown: inside A's daemon pause (freeze),
  dump, diff + metadata + archive, kill; client-side build_image, push (host netns -> registry, local),
  pull (B's daemon, over the wire), create_pod + create_container; inside B's daemon unpack (archive
  and checkpoint image layer), runc_restore, and the rest of StartContainer (rootfs, spec, ...).
  The moved pod and the pulled checkpoint image are removed from B after each run.
- bare: a fresh pod + holder on A, then, timed, `runc --root <A's runc root> checkpoint --file-locks
  --image-path X --work-path Y CID` *without* --leave-running (runc stops the container, as pyshim's
  migrate does), and `runc restore --detach --file-locks --manage-cgroups-mode ignore` of that very
  image directory (bench/restore.py's BareRunc: a private runc root, an overlay of the same image
  layers, pyshim's config.json of the container, into the same pod's namespaces on A).
- raw transfer: the bare checkpoint's image files (the bytes CRIU wrote, in the page cache; the table
  shows their size next to pyshim's archive) sent with sendfile(2) over one plain TCP connection from the host netns to a
  receiver in node B's netns, across the veth wire between them -- the path B's pull takes, and the
  registry's side of the push is local to the host netns. The receiver discards the bytes and answers
  one byte at EOF; the time runs from connect to that answer.

Target (issue 5): downtime <= 1.5 x (bare checkpoint + bare restore + raw transfer), medians.
Nothing is asserted; the figures are printed. Every measured step starts after sync(2).
Everything made here (pods, bare runc containers, netns, wire, registry, temp files) is removed at the
end, on failure and on Ctrl-C too.

Run as root: `make bench-migrate` (or `python -m bench.migrate --sizes 16,256,1024 --runs 3`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cri_api import api_pb2 as cri
from bench.restore import HOLD, MIB, BareRunc, _median, _settle, _table, wait_for_holder
from integration.conftest import container_config, pod_config
from integration.nodes import TwoNodes, two_nodes_up
from pyshim.internal import mounts

TARGET_FACTOR = 1.5
SINK_PORT = 7911
RELAY_PORT = 7912  # bench.direct_relay in node B's netns: `pyshim migrate --direct` over the same wire

# Inside node B's netns: accept one connection, read to EOF, discard, answer one byte.
SINK = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1)
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    n = 0
    while chunk := conn.recv(1 << 20):
        n += len(chunk)
    conn.sendall(b"k"); conn.close()
    print(n, flush=True)
"""


@dataclass
class SizeRow:
    size_mib: int
    downtime: list = field(default_factory=list)  # ms
    client: list = field(default_factory=list)  # migrate's phases_ms
    source: list = field(default_factory=list)  # checkpoint_phases_ms
    target: list = field(default_factory=list)  # restore_phases_ms
    archive_mib: list = field(default_factory=list)
    pyshim_mib_s: list = field(default_factory=list)
    bare_checkpoint: list = field(default_factory=list)  # ms
    bare_restore: list = field(default_factory=list)
    raw_transfer: list = field(default_factory=list)
    raw_mib: list = field(default_factory=list)
    direct_downtime: list = field(default_factory=list)  # ms, `pyshim migrate --direct`
    direct_client: list = field(default_factory=list)
    direct_source: list = field(default_factory=list)  # checkpoint_phases_ms of the --direct runs
    direct_receive: list = field(default_factory=list)  # receive_phases_ms: inside B's receiver
    direct_tail_mib: list = field(default_factory=list)  # left to send when the checkpoint call returned
    direct_target: list = field(default_factory=list)
    direct_mib_s: list = field(default_factory=list)

    def med(self, values) -> float:
        return _median(list(values))

    def breakdown(self, direct: bool = False) -> dict[str, float]:
        """Medians of the downtime's parts, in order (ms)."""
        src, cli, dst = (self.direct_source, self.direct_client, self.direct_target) if direct else \
            (self.source, self.client, self.target)
        parts = {
            "freeze": [p.get("pause", 0) for p in src],
            "dump": [p.get("dump", 0) for p in src],
            "archive": [p.get("diff", 0) + p.get("metadata", 0) + p.get("archive", 0) for p in src],
            "kill": [p.get("kill", 0) for p in src],
            # The CRI call as the client saw it, less what the daemon logged (gRPC, status, the lock).
            "ckpt rest": [c.get("checkpoint", 0) - sum(p.values()) for c, p in zip(cli, src)],
            "build": [c.get("build_image", 0) for c in cli],
            "push": [c.get("push", 0) for c in cli],
            "pull": [c.get("pull", 0) for c in cli],
            # --direct: what the transfer took after the checkpoint call returned (it overlaps the archive)
            "transfer": [c.get("transfer", 0) for c in cli],
            "pod+create": [c.get("create_pod", 0) + c.get("create_container", 0) for c in cli],
            "unpack": [p.get("unpack", 0) for p in dst],
            "restore": [p.get("runc_restore", 0) for p in dst],
            # StartContainer less unpack and runc restore: rootfs, spec, gRPC, ...
            "start rest": [c.get("start", 0) - p.get("unpack", 0) - p.get("runc_restore", 0) for c, p in zip(cli, dst)],
        }
        return {k: self.med(v) for k, v in parts.items()}


class MigrateBench:
    def __init__(self, nodes: TwoNodes, work: Path, archive_dir: Path | None = None):
        self.nodes = nodes
        self.work = work
        self.archive_dir = archive_dir
        self.a = nodes.a.client(timeout=1200)
        self.b = nodes.b.client(timeout=1200)
        self.bare = BareRunc(work / "bare")
        self.sink: subprocess.Popen | None = None
        self.relay: subprocess.Popen | None = None
        self.a.pull(nodes.busybox_ref)

    # ---- helpers -------------------------------------------------------------------------------

    def holder(self, size_mib: int, tag: str) -> tuple[str, str, cri.PodSandboxConfig]:
        """A new pod on A with a container holding size_mib of touched memory; returns (pod, cid, config)."""
        name = f"mig-{size_mib}-{tag}-{uuid.uuid4().hex[:4]}"
        pod = pod_config(name=name, log_directory=str(self.work / "logs" / name))
        pod_id = self.a.run_pod(pod)
        cid = self.a.create(pod_id, container_config(self.nodes.busybox_ref,
                                                     ["sh", "-c", HOLD.format(size=size_mib * MIB)],
                                                     name="hold", log_path="hold.log"), pod)
        self.a.start(cid)
        wait_for_holder(self.spec(cid)["linux"]["cgroupsPath"], size_mib)
        return pod_id, cid, pod

    def spec(self, cid: str) -> dict:
        return json.loads((self.nodes.a.settings.root / "containers" / cid / "config.json").read_text())

    def remove_pod(self, client, pod_id: str) -> None:
        client.stop_pod(pod_id)
        client.remove_pod(pod_id)

    # ---- pyshim migrate ---------------------------------------------------------------------------

    def pyshim_run(self, row: SizeRow, direct: bool = False) -> None:
        _, cid, _ = self.holder(row.size_mib, "p")
        work_dir = self.work / "migrate"
        work_dir.mkdir(mode=0o700, exist_ok=True)
        via = ["--direct", self.direct_command()] if direct else \
            ["--registry", f"{self.nodes.registry.address}/bench", "--insecure"]
        _settle()
        proc = subprocess.run(
            [sys.executable, "-m", "pyshim", "migrate", cid, "--from", self.nodes.a.endpoint,
             "--to", self.nodes.b.endpoint, *via,
             "--work-dir", str(work_dir), "--verify-seconds", "0.5", "--json",
             *(["--archive-dir", str(self.archive_dir)] if self.archive_dir else [])],
            capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"pyshim migrate exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        report = json.loads(proc.stdout)
        if direct:
            row.direct_downtime.append(report["downtime_ms"])
            row.direct_client.append(report["phases_ms"])
            row.direct_source.append(report["checkpoint_phases_ms"])
            row.direct_receive.append(report.get("receive_phases_ms", {}))
            row.direct_tail_mib.append(report.get("streamed_after_checkpoint_bytes", 0) / MIB)
            row.direct_target.append(report["restore_phases_ms"])
            row.direct_mib_s.append(report["transfer_mib_per_s"])
            self.remove_pod(self.b, report["target_pod"])
            self.b.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=report["image"])), timeout=600)
            return
        row.downtime.append(report["downtime_ms"])
        row.client.append(report["phases_ms"])
        row.source.append(report["checkpoint_phases_ms"])
        row.target.append(report["restore_phases_ms"])
        row.archive_mib.append(report["archive_bytes"] / MIB)
        row.pyshim_mib_s.append(report["transfer_mib_per_s"])
        # The moved container's pod and the checkpoint image go, so B's store does not grow run by run.
        self.remove_pod(self.b, report["target_pod"])
        self.b.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=report["image"])), timeout=600)

    def direct_command(self) -> str:
        """The --direct command: bench.direct_relay over one TCP connection to node B, whose end runs
        `pyshim checkpoint-image receive` on B's store (what `ssh node-b pyshim checkpoint-image receive` does)."""
        b = self.nodes.b
        if self.relay is None:
            self.relay = b.popen([sys.executable, "-u", "-m", "bench.direct_relay", "serve", b.wire_ip, str(RELAY_PORT),
                                  "--", sys.executable, "-m", "pyshim", "checkpoint-image", "receive",
                                  "--config", str(b.settings.config_file), "--root", str(b.settings.root)],
                                 stdout=subprocess.PIPE, text=True)
            if self.relay.stdout.readline().strip() != "listening":
                raise RuntimeError("the direct relay in node B's netns did not start")
        return f"{sys.executable} -m bench.direct_relay send {b.wire_ip} {RELAY_PORT}"

    # ---- bare runc + raw transfer ------------------------------------------------------------------

    def bare_run(self, row: SizeRow, i: int) -> None:
        pod_id, cid, _ = self.holder(row.size_mib, "b")
        spec = self.spec(cid)
        lowerdirs = list(reversed(mounts.overlay_lower_dirs(self.nodes.a.settings.root / "containers" / cid / "rootfs")))
        scratch = self.work / f"bare-{row.size_mib}-{i}"
        images, dump_work = scratch / "images", scratch / "dump-work"
        images.mkdir(parents=True)
        dump_work.mkdir()
        bare_id = f"bare-{row.size_mib}-{i}"
        try:
            _settle()
            t = time.perf_counter()
            subprocess.run(["runc", "--root", str(self.nodes.a.settings.state_dir / "runc"), "checkpoint",
                            "--file-locks", "--image-path", str(images), "--work-path", str(dump_work), cid],
                           check=True, capture_output=True, text=True)
            row.bare_checkpoint.append((time.perf_counter() - t) * 1000)
            _settle()
            ms, sent = self.raw_transfer(images)
            row.raw_transfer.append(ms)
            row.raw_mib.append(sent / MIB)
            restore_s, _, _ = self.bare.restore(bare_id, spec, lowerdirs, images, scratch / "no-diff.tar", [],
                                                scratch / "bundle")
            row.bare_restore.append(restore_s * 1000)
        finally:
            if bare_id in self.bare.ids:
                self.bare.remove(bare_id)
            self.a.remove(cid)
            self.remove_pod(self.a, pod_id)
            shutil.rmtree(scratch, ignore_errors=True)

    def raw_transfer(self, images: Path) -> tuple[float, int]:
        """Send every file of `images` over one TCP connection host netns -> node B's netns; (ms, bytes)."""
        if self.sink is None:
            self.sink = self.nodes.b.popen([sys.executable, "-u", "-c", SINK, self.nodes.b.wire_ip, str(SINK_PORT)],
                                           stdout=subprocess.PIPE, text=True)
            if self.sink.stdout.readline().strip() != "listening":
                raise RuntimeError("the transfer sink in node B's netns did not start")
        files = sorted(p for p in images.rglob("*") if p.is_file())
        t = time.perf_counter()
        sent = 0
        with socket.create_connection((self.nodes.b.wire_ip, SINK_PORT), timeout=600) as s:
            for path in files:
                with open(path, "rb") as f:
                    sent += s.sendfile(f)
            s.shutdown(socket.SHUT_WR)
            if s.recv(1) != b"k":
                raise RuntimeError("the transfer sink did not confirm")
        elapsed = (time.perf_counter() - t) * 1000
        received = int(self.sink.stdout.readline())
        if received != sent:
            raise RuntimeError(f"raw transfer: sent {sent} bytes, the sink got {received}")
        return elapsed, sent

    def close(self) -> None:
        try:
            self.bare.remove_all()
        finally:
            for helper in (self.sink, self.relay):
                if helper is not None:
                    helper.kill()
                    helper.wait()
                    helper.stdout.close()
            self.a.close()
            self.b.close()


# ---- report ----------------------------------------------------------------------------------------

def report(rows: list[SizeRow], runs: int) -> str:
    out = [f"pyshim migrate A -> B through the registry vs bare runc, median of {runs} runs (ms unless noted)",
           "raw = the checkpoint's bytes over one TCP connection, host netns -> node B netns across the veth wire"]
    table = []
    verdicts = []
    for r in rows:
        down = r.med(r.downtime)
        bc, br, raw = r.med(r.bare_checkpoint), r.med(r.bare_restore), r.med(r.raw_transfer)
        bare = bc + br + raw
        ratio = down / bare
        met = down <= TARGET_FACTOR * bare
        raw_mib_s = r.med(m / (ms / 1000) for m, ms in zip(r.raw_mib, r.raw_transfer))
        table.append([f"{r.size_mib}", f"{r.med(r.archive_mib):.1f}", f"{r.med(r.raw_mib):.1f}", f"{down:.0f}", f"{bc:.0f}", f"{br:.0f}",
                      f"{raw:.0f}", f"{bare:.0f}", f"{TARGET_FACTOR * bare:.0f}", f"{ratio:.2f}x",
                      "met" if met else "MISSED", f"{r.med(r.pyshim_mib_s):.0f}", f"{raw_mib_s:.0f}"])
        verdicts.append(f"{r.size_mib} MiB: downtime {down:.0f} ms vs allowed {TARGET_FACTOR * bare:.0f} ms "
                        f"(1.5 x ({bc:.0f} + {br:.0f} + {raw:.0f})) -> {'MET' if met else 'NOT MET'}")
    out.append(_table(["MiB", "archive MiB", "raw MiB", "downtime", "bare ckpt", "bare restore", "raw xfer", "bare sum",
                       "1.5x bare sum", "downtime/bare", "target", "push+pull MiB/s", "raw MiB/s"], table))
    out.append("")
    names = list(rows[0].breakdown()) if rows else []
    out.append("Where the downtime goes (medians, ms): A's daemon freeze=pause, dump, archive=diff+metadata+archive, "
               "kill; ckpt rest = CheckpointContainer call less those; client build/push/pull/pod+create; B's "
               "daemon unpack, restore=runc_restore; start rest = StartContainer less those")
    out.append(_table(["MiB", *names, "sum", "downtime"],
                      [[f"{r.size_mib}", *[f"{v:.0f}" for v in r.breakdown().values()],
                        f"{sum(r.breakdown().values()):.0f}", f"{r.med(r.downtime):.0f}"] for r in rows]))
    out.append("")
    if any(r.direct_downtime for r in rows):
        out.append("`pyshim migrate --direct` (archive over one TCP connection into B's `checkpoint-image receive`, "
                   "no registry), medians (ms)")
        table = []
        for r in rows:
            down, bare = r.med(r.direct_downtime), r.med(r.bare_checkpoint) + r.med(r.bare_restore) + r.med(r.raw_transfer)
            raw_mib_s = r.med(m / (ms / 1000) for m, ms in zip(r.raw_mib, r.raw_transfer))
            rate = r.med(r.direct_mib_s)
            table.append([f"{r.size_mib}", f"{down:.0f}", f"{bare:.0f}", f"{down / bare:.2f}x",
                          f"{r.med(c.get('transfer', 0) for c in r.direct_client):.0f}",
                          f"{r.med(p.get('unpack', 0) for p in r.direct_target):.0f}",
                          f"{r.med(p.get('runc_restore', 0) for p in r.direct_target):.0f}",
                          f"{rate:.0f}", f"{raw_mib_s:.0f}", f"{rate / raw_mib_s:.0%}"])
            verdicts.append(f"{r.size_mib} MiB --direct: downtime {down:.0f} ms = {down / bare:.2f} x bare sum "
                            f"{bare:.0f} ms; transfer {rate:.0f} MiB/s = {rate / raw_mib_s:.0%} of raw TCP")
        out.append(_table(["MiB", "downtime", "bare sum", "downtime/bare", "transfer", "unpack", "restore",
                           "MiB/s", "raw MiB/s", "of raw"], table))
        out.append("Where the --direct downtime goes (medians, ms), as above")
        names = list(rows[0].breakdown(direct=True))
        out.append(_table(["MiB", *names, "sum", "downtime"],
                          [[f"{r.size_mib}", *[f"{v:.0f}" for v in r.breakdown(direct=True).values()],
                            f"{sum(r.breakdown(direct=True).values()):.0f}", f"{r.med(r.direct_downtime):.0f}"]
                           for r in rows]))
        for r in rows:
            phases = {k: r.med(p.get(k, 0) for p in r.direct_receive) for k in ("data", "check", "record")}
            out.append(f"  {r.size_mib} MiB: B's receiver " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
                       + f" ms (data overlaps the archive's writing); {r.med(r.direct_tail_mib):.1f} MiB were left "
                       "to send when CheckpointContainer returned; MiB/s counts from the first byte sent to stored")
        out.append("")
    out.append("Per run (ms): downtime | bare ckpt + restore + raw")
    for r in rows:
        bare = [f"{c:.0f}+{s:.0f}+{x:.0f}" for c, s, x in zip(r.bare_checkpoint, r.bare_restore, r.raw_transfer)]
        out.append(f"  {r.size_mib:>5} MiB: {', '.join(f'{d:.0f}' for d in r.downtime)} | {', '.join(bare)}")
    out.append("")
    out.append("Targets (downtime <= 1.5 x (bare checkpoint + bare restore + raw transfer))")
    out.extend(f"  {v}" for v in verdicts)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,256,1024", help="MiB of touched memory, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-direct", dest="direct", action="store_false",
                        help="skip the `pyshim migrate --direct` runs")
    parser.add_argument("--lazy", action="store_true", help="`migrate --lazy` vs eager instead (bench/migrate_lazy.py; "
                                                            "sizes default to 256,1024)")
    parser.add_argument("--archive-dir", help="archives of the moves in a new directory under this one (e.g. /dev/shm, "
                                              "a tmpfs): pyshim migrate --archive-dir")
    parser.add_argument("--only-direct", action="store_true",
                        help="only the `pyshim migrate --direct` runs and the bare baseline (no registry runs)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.lazy:
        from bench import migrate_lazy
        migrate_lazy.main(sizes if "--sizes" in sys.argv else [256, 1024], args.runs)
        return
    rows = [SizeRow(n) for n in sizes]
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="pyshim-migbench-", dir="/tmp"))
    archives = Path(tempfile.mkdtemp(prefix="migbench-archives-", dir=args.archive_dir)) if args.archive_dir else None
    try:
        with two_nodes_up() as nodes:
            bench = MigrateBench(nodes, work, archive_dir=archives)
            try:
                for row in rows:
                    for i in range(args.runs):
                        # Alternate who goes first, so neither side always meets a warmer cache.
                        steps = [lambda: bench.pyshim_run(row), lambda: bench.bare_run(row, i)]
                        if args.only_direct:
                            steps = [lambda: bench.pyshim_run(row, direct=True), lambda: bench.bare_run(row, i)]
                        elif args.direct:
                            steps.insert(1, lambda: bench.pyshim_run(row, direct=True))
                        for step in (steps if i % 2 == 0 else steps[::-1]):
                            step()
                        downtime = (row.direct_downtime if args.only_direct else row.downtime)[-1]
                        print(f"  {row.size_mib} MiB run {i + 1}: downtime {downtime:.0f} ms; bare "
                              f"{row.bare_checkpoint[-1]:.0f} + {row.bare_restore[-1]:.0f} + raw "
                              f"{row.raw_transfer[-1]:.0f} ms", file=sys.stderr, flush=True)
            except BaseException:
                for node in nodes.nodes:
                    print(f"daemon log of node {node.name}:\n{node.daemon.log_tail(30)}", file=sys.stderr)
                raise
            finally:
                bench.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if archives is not None:
            shutil.rmtree(archives, ignore_errors=True)
    print(report(rows, args.runs))
    print(f"\nload average (1 min) at start {load_before:.2f}, at end {os.getloadavg()[0]:.2f}, "
          f"on {os.cpu_count()} CPUs; left behind: nothing (two_nodes_up checks and raises otherwise)")


if __name__ == "__main__":
    main()
