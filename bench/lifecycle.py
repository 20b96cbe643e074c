"""Benchmark of the CRI lifecycle against bare runc, measured in the same run (ratios are what count).

Prints: median RunPodSandbox; median CreateContainer+StartContainer next to bare `runc create` +
`runc start` of an equivalent container (same image layers on an overlay, same config.json minus
the pod's joined namespaces); median StopContainer+RemoveContainer next to bare `runc kill` +
`runc delete`; the daemon's idle RSS, its RSS with N running pods, and conmon's RSS per container.
Then start-up recovery: the time from starting the daemon to a served Version call with nothing
recorded, and with `--recovery-pods` real pods of `--recovery-containers` real running containers
each (the daemon restarted over them; 0 pods skips this part).

Run as root: `make bench` (or `python -m bench.lifecycle --runs 20`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from cri_api import api_pb2 as cri
from integration.conftest import container_config, discard, new_settings, pod_config
from integration.daemon import Daemon
from integration.registry_server import RegistryServer
from integration.testimage import push_busybox
from pyshim.internal import mounts


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _conmon_pids(base: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"conmon") and any(str(base).encode() in a for a in argv):
                pids.append(int(proc.name))
    return pids


def bench_pyshim(client, image: str, runs: int):
    pods, run_pod, create_start, stop_remove = [], [], [], []
    for i in range(runs):
        pod = pod_config(name=f"bench-{i}")
        t = time.perf_counter()
        pod_id = client.run_pod(pod)
        run_pod.append(time.perf_counter() - t)
        pods.append((pod, pod_id))
    containers = []
    for i, (pod, pod_id) in enumerate(pods):
        t = time.perf_counter()
        cid = client.create(pod_id, container_config(image, ["sleep", "3600"], name="c"), pod)
        client.start(cid)
        create_start.append(time.perf_counter() - t)
        containers.append(cid)
    return pods, containers, run_pod, create_start, stop_remove


def bench_bare_runc(template_bundle: Path, lowerdir: list[Path], work: Path, runs: int):
    """runc create + start, and kill + delete, of the same image and nearly the same config, no CRI."""
    spec = json.loads((template_bundle / "config.json").read_text())
    # A bare runc container cannot join a pod's pinned namespaces; give it fresh ones, as `runc run` would.
    spec["linux"]["namespaces"] = [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]
    spec["linux"].pop("sysctl", None)
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] not in ("/etc/resolv.conf", "/etc/hosts",
                                                                             "/etc/hostname")]
    root = work / "runc-root"
    create_start, stop_remove = [], []
    for i in range(runs):
        bundle = work / f"b{i}"
        for d in ("upper", "work", "rootfs"):
            (bundle / d).mkdir(parents=True)
        mounts.mount_overlay(lowerdir, bundle / "upper", bundle / "work", bundle / "rootfs")
        spec["root"]["path"] = str(bundle / "rootfs")
        spec["linux"]["cgroupsPath"] = f"/pyshim-bench-bare/{i}"
        (bundle / "config.json").write_text(json.dumps(spec))
        cid = f"bare-{i}"
        t = time.perf_counter()
        subprocess.run(["runc", "--root", str(root), "create", "--bundle", str(bundle), cid], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["runc", "--root", str(root), "start", cid], check=True)
        create_start.append(time.perf_counter() - t)
    for i in range(runs):
        cid = f"bare-{i}"
        t = time.perf_counter()
        subprocess.run(["runc", "--root", str(root), "kill", cid, "KILL"], check=True)
        while json.loads(subprocess.run(["runc", "--root", str(root), "state", cid], capture_output=True,
                                        check=True).stdout)["status"] != "stopped":
            time.sleep(0.002)
        subprocess.run(["runc", "--root", str(root), "delete", cid], check=True)
        stop_remove.append(time.perf_counter() - t)
        mounts.unmount(work / f"b{i}" / "rootfs")
    subprocess.run(["rmdir", *[str(p) for p in Path("/sys/fs/cgroup").glob("*/pyshim-bench-bare/*")]],
                   capture_output=True)
    subprocess.run(["rmdir", *[str(p) for p in Path("/sys/fs/cgroup").glob("*/pyshim-bench-bare")]],
                   capture_output=True)
    return create_start, stop_remove


def _time_to_serve(daemon: Daemon) -> float:
    t = time.perf_counter()
    daemon.start(timeout=300)
    return time.perf_counter() - t


def _last_recovery_ms(daemon: Daemon) -> float | None:
    found = None
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        if '"recovery done"' in line:
            found = json.loads(line).get("ms")
    return found


def bench_recovery(client_daemon: Daemon, image: str, pods: int, per_pod: int) -> dict:
    """Time to serve after a restart over `pods` x `per_pod` real running containers, next to an empty start."""
    empty_settings = new_settings("benche", "10.86.10.0/24")
    empty = Daemon(empty_settings)
    try:
        empty_start = _time_to_serve(empty)
        empty.stop()
        empty_restart = _time_to_serve(empty)
    finally:
        empty.stop()
        discard(empty_settings)
    made = []
    with client_daemon.client() as client:
        for i in range(pods):
            pod = pod_config(name=f"rec-{i}")
            pod_id = client.run_pod(pod)
            made.append(pod_id)
            for j in range(per_pod):
                cid = client.create(pod_id, container_config(image, ["sleep", "3600"], name=f"c{j}"), pod)
                client.start(cid)
    client_daemon.stop()
    loaded_restart = _time_to_serve(client_daemon)
    recovery_ms = _last_recovery_ms(client_daemon)
    with client_daemon.client() as client:
        for pod_id in made:
            client.stop_pod(pod_id)
            client.remove_pod(pod_id)
    return {"empty_start_to_serve_ms": _ms(empty_start), "empty_restart_to_serve_ms": _ms(empty_restart),
            f"restart_with_{pods}_pods_{pods * per_pod}_containers_to_serve_ms": _ms(loaded_restart),
            "restart_extra_over_empty_ms": _ms(loaded_restart - empty_restart),
            "recovery_ms_in_daemon_log": recovery_ms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--recovery-pods", type=int, default=100)
    parser.add_argument("--recovery-containers", type=int, default=2, help="per pod")
    args = parser.parse_args()
    recovery = {}
    settings = new_settings("bench", "10.86.9.0/24")
    daemon = Daemon(settings)
    with RegistryServer() as registry:
        image = push_busybox(registry.address)
        daemon.start()
        try:
            time.sleep(1)
            idle_rss = daemon.rss_kib
            with daemon.client() as client:
                client.pull(image)
                pods, containers, run_pod, create_start, _ = bench_pyshim(client, image, args.runs)
                time.sleep(1)
                loaded_rss = daemon.rss_kib
                conmon_rss = [_rss_kib(pid) for pid in _conmon_pids(settings.base)]
                record = settings.root / "containers" / containers[0]
                lowerdirs = list(reversed(mounts.overlay_lower_dirs(record / "rootfs")))
                bare_create_start, bare_stop_remove = bench_bare_runc(record, lowerdirs, settings.base / "bare",
                                                                      args.runs)
                stop_remove = []
                for cid in containers:
                    t = time.perf_counter()
                    client.stop(cid, timeout=0)
                    client.remove(cid)
                    stop_remove.append(time.perf_counter() - t)
                for _, pod_id in pods:
                    client.stop_pod(pod_id)
                    client.remove_pod(pod_id)
            if args.recovery_pods:
                recovery = bench_recovery(daemon, image, args.recovery_pods, args.recovery_containers)
        finally:
            daemon.stop()
            discard(settings)
    med = statistics.median
    report = {
        "runs": args.runs,
        "RunPodSandbox_ms": _ms(med(run_pod)),
        "CreateContainer+StartContainer_ms": _ms(med(create_start)),
        "bare_runc_create+start_ms": _ms(med(bare_create_start)),
        "create+start_ratio": round(med(create_start) / med(bare_create_start), 2),
        "StopContainer+RemoveContainer_ms": _ms(med(stop_remove)),
        "bare_runc_kill+delete_ms": _ms(med(bare_stop_remove)),
        "stop+remove_ratio": round(med(stop_remove) / med(bare_stop_remove), 2),
        "daemon_idle_rss_MiB": round(idle_rss / 1024, 1),
        f"daemon_rss_with_{args.runs}_pods_MiB": round(loaded_rss / 1024, 1),
        "daemon_rss_per_extra_container_MiB": round((loaded_rss - idle_rss) / 1024 / args.runs, 2),
        "conmon_rss_per_container_MiB": round(statistics.mean(conmon_rss) / 1024, 2) if conmon_rss else None,
        **recovery,
    }
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
