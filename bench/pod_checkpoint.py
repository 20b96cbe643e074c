"""Benchmark of CheckpointPod and RestorePod (issue 14, "Performance"): figures, nothing asserted.

For pods of 1, 2 and 4 containers, each holding 64 MiB of touched anonymous memory (busybox `sort`
keeps its whole input until EOF, which never comes), per run:
- CheckpointPod of all the pod's containers: the time the pod is frozen (the daemon's `frozen_ms`
  of its "pod checkpointed" log line: first `runc pause` to last `runc resume` returned);
- the same containers checkpointed one after another with CheckpointContainer: the sum of their
  `frozen_ms` (what a pod-wide cut by sequential calls would freeze the first container for) and the
  slowest single one (the target's reference: dumps side by side should cost about one dump);
- RestorePod plus one StartContainer per returned container (client wall time), against the
  sequential restores of the container archives (a new pod, CreateContainer naming the archive,
  StartContainer; their sum and the largest single one).
Medians over --runs. Targets: for two containers, pod frozen <= 1.2 x the slowest standalone
frozen time; RestorePod + StartContainers <= the largest single restore + 100 ms.

Run as root: `make bench-pod` (or `python -m bench.pod_checkpoint --sizes 1,2,4 --runs 3`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from cri_api import api_pb2 as cri
from integration.conftest import container_config, discard, new_settings, pod_config
from integration.daemon import Daemon, leftovers, remove_everything
from integration.registry_server import RegistryServer
from integration.testimage import push_busybox

MiB = 2**20
HOLD = "(head -c {size} /dev/zero | tr '\\000' a; sleep 1000000) | sort"


def _own_pid() -> "cri.LinuxContainerConfig":
    return cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
        namespace_options=cri.NamespaceOption(pid=cri.NamespaceMode.CONTAINER)))


def _pod(scratch: Path) -> "cri.PodSandboxConfig":
    # Inside the run's scratch directory, which is removed at the end: the logs must not pile up in /tmp.
    pod = pod_config(log_directory=tempfile.mkdtemp(prefix="logs-", dir=scratch))
    pod.linux.security_context.namespace_options.pid = cri.NamespaceMode.CONTAINER
    return pod


def _log_entries(daemon: Daemon, msg: str) -> list[dict]:
    entries = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        if f'"msg": "{msg}"' in line:
            entries.append(json.loads(line))
    return entries


def _wait_rss(client, ids: list[str], size: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    for cid in ids:
        while client.runtime.ContainerStats(cri.ContainerStatsRequest(container_id=cid)).stats.memory.rss_bytes.value \
                < size:
            if time.monotonic() > deadline:
                raise SystemExit(f"container {cid} never held {size} bytes")
            time.sleep(0.3)


def _settle() -> None:
    subprocess.run(["sync"], check=False)
    time.sleep(0.5)


def _remove_pod(client, pod_id: str) -> None:
    client.stop_pod(pod_id)
    client.remove_pod(pod_id)


def run(n: int, runs: int, size_mib: int, image: str, daemon: Daemon, scratch: Path) -> dict:
    figures = {"pod_frozen": [], "seq_frozen_sum": [], "seq_frozen_max": [], "restore_pod": [],
               "seq_restore_sum": [], "seq_restore_max": []}
    phases = {"pod_checkpoint": [], "container_checkpoint": [], "pod_restore": [], "container_restore": []}
    with daemon.client(timeout=600) as c:
        pod = _pod(scratch)
        pod_id = c.run_pod(pod)
        configs = [container_config(image, ["sh", "-c", HOLD.format(size=size_mib * MiB)], name=f"m{i}",
                                    linux=_own_pid()) for i in range(n)]
        ids = []
        for config in configs:
            ids.append(c.create(pod_id, config, pod))
            c.start(ids[-1])
        _wait_rss(c, ids, size_mib * MiB)
        for r in range(runs):
            out = scratch / f"pod-{n}-{r}"
            out.mkdir()
            _settle()
            before = len(_log_entries(daemon, "pod checkpointed"))
            c.checkpoint_pod(pod_id, str(out), ids)
            entry = _log_entries(daemon, "pod checkpointed")[before]
            figures["pod_frozen"].append(entry["frozen_ms"])
            phases["pod_checkpoint"].append(entry.get("phases_ms", {}))

            archives, frozen = [], []
            for cid in ids:
                _settle()
                archive = scratch / f"ctr-{n}-{r}-{cid[:8]}.tar"
                before = len(_log_entries(daemon, "container checkpointed"))
                c.runtime.CheckpointContainer(cri.CheckpointContainerRequest(
                    container_id=cid, location=str(archive), timeout=300), timeout=310)
                entry = _log_entries(daemon, "container checkpointed")[before]
                frozen.append(entry["frozen_ms"])
                phases["container_checkpoint"].append(entry.get("phases_ms", {}))
                archives.append(archive)
            figures["seq_frozen_sum"].append(sum(frozen))
            figures["seq_frozen_max"].append(max(frozen))

            _settle()
            before = len(_log_entries(daemon, "container restored"))
            started = time.monotonic()
            response = c.restore_pod(str(out), _pod(scratch), configs)
            restore_pod_ms = (time.monotonic() - started) * 1000
            for restored in response.restored_containers:
                c.start(restored.container_id)
            figures["restore_pod"].append((time.monotonic() - started) * 1000)
            restore_pod_phases = _log_entries(daemon, "pod restored (containers CREATED)")[-1].get("phases_ms", {})
            phases["pod_restore"].append({"RestorePod": restore_pod_ms, **restore_pod_phases, **{
                f"{k}[{i}]": v for i, e in enumerate(_log_entries(daemon, "container restored")[before:])
                for k, v in e.get("ms", {}).items()}})
            _remove_pod(c, response.pod_sandbox_id)

            singles = []
            for archive, config in zip(archives, configs):
                new_pod = _pod(scratch)
                new_id = c.run_pod(new_pod)
                restore = cri.ContainerConfig()
                restore.CopyFrom(config)
                restore.image.image = str(archive)
                _settle()
                before = len(_log_entries(daemon, "container restored"))
                started = time.monotonic()
                cid = c.create(new_id, restore, new_pod)
                c.start(cid)
                singles.append((time.monotonic() - started) * 1000)
                phases["container_restore"].append(_log_entries(daemon, "container restored")[before].get("ms", {}))
                _remove_pod(c, new_id)
            figures["seq_restore_sum"].append(sum(singles))
            figures["seq_restore_max"].append(max(singles))
            shutil.rmtree(out, ignore_errors=True)
            for archive in archives:
                archive.unlink(missing_ok=True)
        _remove_pod(c, pod_id)
    medians = {k: statistics.median(v) for k, v in figures.items()}
    medians["phases"] = {what: _median_phases(runs_of) for what, runs_of in phases.items()}
    return medians


def _median_phases(entries: list[dict]) -> dict:
    """Per phase name, the median over the entries that have it (ms): where the time goes."""
    names = list(dict.fromkeys(k for e in entries for k in e))
    return {k: round(statistics.median(e[k] for e in entries if k in e), 1) for k in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,2,4", help="containers per pod")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=64, help="memory per container")
    parser.add_argument("--phases", action="store_true", help="also print where the time goes (daemon phase timers)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="pyshim-bench-pod-", dir="/var/tmp"))
    settings = new_settings("bp", "10.86.9.0/24")
    daemon = Daemon(settings)
    try:
        with RegistryServer() as registry:
            image = push_busybox(registry.address)
            daemon.start()
            with daemon.client() as c:
                c.pull(image)
            results = {n: run(n, args.runs, args.mib, image, daemon, scratch)
                       for n in (int(s) for s in args.sizes.split(","))}
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            with daemon.client() as c:
                remove_everything(c)
        daemon.stop()
        left = leftovers(settings) + discard(settings)
        shutil.rmtree(scratch, ignore_errors=True)
        if left:
            print(f"left behind: {left}")
    print(f"\nCheckpointPod vs sequential CheckpointContainer, {args.mib} MiB per container, "
          f"medians of {args.runs} (ms)")
    print(f"{'containers':>10} {'pod frozen':>11} {'seq sum':>9} {'seq max':>9} {'pod/max':>8} "
          f"{'RestorePod+start':>17} {'seq restores':>13} {'max restore':>12} {'target':>8}")
    for n, f in results.items():
        print(f"{n:>10} {f['pod_frozen']:>11.0f} {f['seq_frozen_sum']:>9.0f} {f['seq_frozen_max']:>9.0f} "
              f"{f['pod_frozen'] / f['seq_frozen_max']:>8.2f} {f['restore_pod']:>17.0f} "
              f"{f['seq_restore_sum']:>13.0f} {f['seq_restore_max']:>12.0f} {f['seq_restore_max'] + 100:>8.0f}")
    print("targets (n=2): pod frozen <= 1.2 x seq max; RestorePod+start <= max restore + 100 ms")
    if args.phases:
        for n, f in results.items():
            print(f"\nphases, {n} container(s), medians (ms):")
            for what, ms in f["phases"].items():
                print(f"  {what:>21}: " + ", ".join(f"{k} {v:.0f}" for k, v in ms.items()))


if __name__ == "__main__":
    main()
