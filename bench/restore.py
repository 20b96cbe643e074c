"""Benchmark of restore (issue 4, "Performance"): pyshim against bare `runc restore`, in the same run.

Two measurements; figures and ratios are printed, nothing is asserted.

1. Memory-holding containers (16/256/1024 MiB by default). A busybox `sort` holds the memory: it
   keeps every input line until EOF, and EOF never comes (`(yes LINE | head -c SIZE; sleep) | sort`),
   so SIZE bytes of anonymous memory are really written and stay resident; its VmRSS is read from
   /proc/<pid>/status before the checkpoint and again after each restore (pyshim's and bare runc's).
   One CRI CheckpointContainer per size, then per run:
     - pyshim: a new pod, CreateContainer naming the archive path, and the timed StartContainer
       (wall time of the gRPC call). Its per-phase milliseconds come from the daemon's
       "container restored" log line; `unpack_rootfs_diff` there is the rootfs-diff apply time of
       the target.
     - bare runc, same checkpoint: the archive's checkpoint/ directory extracted once per size
       (untimed, but its duration is printed next to pyshim's `unpack_criu_images`), an overlay of
       the same image layers with the archive's rootfs-diff.tar and deleted.files applied (untimed),
       and the config.json pyshim wrote for the container it just restored, with only root.path and
       cgroupsPath changed. That config keeps the namespace paths of the restored container's pod:
       pyshim's container is stopped and removed first, and the bare restore goes into that pod's
       still-existing PID (infra process), network, IPC and UTS namespaces. This was chosen because
       it makes runc and CRIU do exactly the work they do under pyshim (join external namespaces,
       same mounts, same cgroup depth: the cgroup is a sibling `bare-*` under the same pod), so the
       difference is pyshim's own overhead (archive unpacking, overlay, spec, conmon, bookkeeping).
       A config with fresh namespaces instead would make CRIU create a PID and network namespace,
       which is different work. The UTS image gets the new pod's hostname (as pyshim does; the time
       of that rewrite is printed), so CRIU writes the same hostname into the same namespace.
       Then, timed: `runc --root <private> restore --detach --image-path IMAGES --work-path BUNDLE
       --bundle BUNDLE --pid-file ... --file-locks --manage-cgroups-mode ignore ID` with stdout and
       stderr on fresh pipes and stdin on /dev/null, as conmon gives them (the checkpoint's
       descriptors.json names two pipes and /dev/null). Then `runc kill --all` + `runc delete`.
   Issue 13: the archive is also built into a checkpoint image, pushed to the registry and pulled
   back by the daemon (PullImage unpacks its CRIU images into the store; untimed, printed). Each run
   restores three times: from the archive path the first time (the archive's ctime is renewed, so
   the store unpacks it again), the same archive a second time (images linked from the store),
   and from the pulled checkpoint image -- the one the bare restore above follows.
   Targets: from the pulled image StartContainer <= 1.1 x bare runc restore + rootfs-diff apply;
   from an archive path the first time, that plus one copy of the images (`tar -x checkpoint/`).
   Before every timed call (StartContainer, bare `runc restore`, a cold CreateContainer) the bench
   runs sync(2), untimed: right after a 1 GiB checkpoint and extraction this VM's disk is still
   writing back gigabytes, and that writeback made whichever restore came next up to 3x slower
   (CRIU's one preadv of the pages, 0.6 s, took 2.3 s) -- noise from the previous step, not the
   cost of the call being timed. pyshim's own extraction of the images inside StartContainer is of
   course not settled: that is part of its cost.

2. A slow-starting service: a busybox shell loop that builds state (a running hash) for about 10 s,
   then serves it with `nc -ll -p 8080 -e echo ...` (busybox nc: -ll with -e is a persistent
   server). The client is this process, connecting from the host to the pod IP through the CNI
   bridge (no ExecSync), every 10 ms until an answer comes. Timed from just before CreateContainer
   (the pod already runs, RunPodSandbox is not counted) to the first complete answer: a cold start
   (CreateContainer + StartContainer + 10 s of initialisation) versus a restore, in a new pod, of a
   checkpoint taken after the initialisation (CreateContainer naming the archive + StartContainer).
   The answer after a restore must be the same state the cold start computed.
   Target: first answer at least 10x sooner after a restore than after a cold start (medians).

Everything is cleaned up: pods, containers, archives, the bare runc containers and their cgroups,
mounts; the daemon's leftovers are checked at the end.

Run as root: `make bench-restore` (or `python -m bench.restore --runs 3`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cri_api import api_pb2 as cri
from criu_glue.criu import prepare_restore_images
from criu_glue.rootfs_diff import apply_rootfs_diff
from integration.conftest import container_config, discard, new_settings
from integration.daemon import Daemon, DaemonSettings, leftovers
from integration.registry_server import RegistryServer
from integration.testimage import push_busybox
from pyshim.internal import cgroups, mounts

MIB = 2**20
HOSTNAME = "restored"  # every restore pod's hostname, so one UTS rewrite serves all bare runs of a size
SERVICE_PORT = 8080
CGROUP_ROOT = Path("/sys/fs/cgroup")

# 1023 'a' and a newline per line: SIZE bytes of input become SIZE bytes of lines held by sort.
HOLD = "(yes $(head -c 1023 /dev/zero | tr '\\000' a) | head -c {size}; sleep 100000) | sort"

# Builds state for INIT centiseconds (a hash over a counter, timed by /proc/uptime, no fork per
# iteration), then serves that state to every connection.
SLOW_SERVICE = (
    "read t0 _ < /proc/uptime; t0=${{t0%.*}}${{t0#*.}}; n=0; h=7; "
    "while read t _ < /proc/uptime; [ $((${{t%.*}}${{t#*.}} - t0)) -lt {centis} ]; do "
    "n=$((n+1)); h=$(((h*31+n)%1000000007)); done; "
    "echo initialised n=$n h=$h; "
    "exec nc -ll -p {port} -e echo \"ready n=$n h=$h\""
)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _holder_rss_kib(cgroups_path: str) -> int:
    """VmRSS of the `sort` that holds the memory, found among the container's cgroup's processes."""
    return max((_rss_kib(p) for p in cgroups.processes(cgroups_path) if _comm(p) == "sort"), default=0)


def _settle() -> None:
    """Before every timed call: write back what earlier steps wrote (1 GiB archives, extracted images),
    so that neither side pays for the other's or a previous step's writeback."""
    os.sync()


def wait_for_holder(cgroups_path: str, size_mib: int, timeout: float = 300) -> int:
    """Wait until the HOLD container's `sort` holds size_mib resident (its input done); returns its VmRSS KiB."""
    deadline = time.monotonic() + timeout
    while True:
        comms = {_comm(p) for p in cgroups.processes(cgroups_path)}
        if _holder_rss_kib(cgroups_path) >= size_mib * 1024 and not comms & {"head", "yes"}:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{size_mib} MiB holder never got resident: {comms}, "
                               f"{_holder_rss_kib(cgroups_path)} KiB")
        time.sleep(0.1)
    time.sleep(0.5)
    return _holder_rss_kib(cgroups_path)


def _remove_cgroup(cgroups_path: str) -> None:
    for controller in CGROUP_ROOT.iterdir():
        d = controller / cgroups_path.lstrip("/")
        if d.is_dir():
            try:
                d.rmdir()
            except OSError:
                pass


@dataclass
class MemoryRow:
    size_mib: int
    runs: int
    source_rss_kib: int = 0
    archive_mib: float = 0.0
    checkpoint_s: float = 0.0
    create_s: list[float] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    restored_rss_kib: list[int] = field(default_factory=list)
    bare_s: list[float] = field(default_factory=list)
    bare_rss_kib: list[int] = field(default_factory=list)
    bare_diff_apply_s: list[float] = field(default_factory=list)
    bare_extract_s: float = 0.0
    uts_rewrite_s: float = 0.0
    # start_s/phases above: restores naming the pulled checkpoint image (the bare restore follows each).
    first_s: list[float] = field(default_factory=list)  # archive path, its images not in the store yet
    first_phases: list[dict[str, float]] = field(default_factory=list)
    second_s: list[float] = field(default_factory=list)  # the same archive again: linked from the store
    second_phases: list[dict[str, float]] = field(default_factory=list)
    pull_s: float = 0.0

    def phase(self, name: str) -> float:
        return _median([p.get(name, float("nan")) for p in self.phases]) / 1000

    @property
    def target_s(self) -> float:
        # Issue 13: from a pulled checkpoint image at most 1.1x bare runc restore (+ the diff apply,
        # which the bare side does untimed).
        return 1.1 * _median(self.bare_s) + self.phase("unpack_rootfs_diff")

    @property
    def first_target_s(self) -> float:
        # ... and from an archive path the first time, plus one copy of the images at disk speed.
        return self.target_s + self.bare_extract_s


@dataclass
class SlowRow:
    init_s: float
    runs: int
    cold_first_answer_s: list[float] = field(default_factory=list)
    restore_first_answer_s: list[float] = field(default_factory=list)
    restore_start_s: list[float] = field(default_factory=list)
    cold_answer: str = ""
    restored_answers: list[str] = field(default_factory=list)
    checkpoint_s: float = 0.0


class BareRunc:
    """`runc restore` of a pyshim archive's checkpoint, with no pyshim in between."""

    def __init__(self, work: Path):
        self.work = work
        self.root = work / "runc-root"
        self.ids: dict[str, tuple[Path, str, list[int]]] = {}  # id -> (bundle, cgroupsPath, pipe read fds)

    def runc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["runc", "--root", str(self.root), *args], capture_output=True, text=True,
                              check=check)

    def prepare(self, archive: Path, size_dir: Path) -> tuple[Path, Path, list[str], float, float]:
        """Extract checkpoint/, rootfs-diff.tar and deleted.files; returns (images, diff, deleted,
        extract seconds, UTS rewrite seconds)."""
        size_dir.mkdir(parents=True)
        t = time.perf_counter()
        subprocess.run(["tar", "-xf", str(archive), "-C", str(size_dir), "checkpoint"], check=True)
        extract = time.perf_counter() - t
        images = size_dir / "checkpoint"
        t = time.perf_counter()
        prepare_restore_images(images, HOSTNAME)
        uts = time.perf_counter() - t
        with tarfile.open(archive) as tar:
            names = set(tar.getnames())
            wanted = [n for n in ("rootfs-diff.tar", "deleted.files") if n in names]
        if wanted:
            subprocess.run(["tar", "-xf", str(archive), "-C", str(size_dir), *wanted], check=True)
        diff = size_dir / "rootfs-diff.tar"
        deleted_file = size_dir / "deleted.files"
        deleted = json.loads(deleted_file.read_text()) if deleted_file.exists() else []
        return images, diff, deleted or [], extract, uts

    def restore(self, cid: str, template: dict, lowerdirs: list[Path], images: Path, diff: Path,
                deleted: list[str], bundle: Path) -> tuple[float, float, str]:
        """Returns (runc restore seconds, diff apply seconds, the container's cgroupsPath)."""
        for d in ("upper", "work", "rootfs"):
            (bundle / d).mkdir(parents=True)
        rootfs = bundle / "rootfs"
        mounts.mount_overlay(lowerdirs, bundle / "upper", bundle / "work", rootfs)
        cgroups_path = template["linux"]["cgroupsPath"].rsplit("/", 1)[0] + f"/{cid}"
        self.ids[cid] = (bundle, cgroups_path, [])
        t = time.perf_counter()
        apply_rootfs_diff(diff if diff.exists() else None, deleted, rootfs)
        diff_apply = time.perf_counter() - t
        spec = json.loads(json.dumps(template))
        spec["root"]["path"] = str(rootfs)
        spec["linux"]["cgroupsPath"] = cgroups_path
        (bundle / "config.json").write_text(json.dumps(spec))
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.ids[cid][2].extend((out_r, err_r))
        cmd = ["runc", "--root", str(self.root), "--log", str(bundle / "runc.log"), "restore", "--detach",
               "--image-path", str(images), "--work-path", str(bundle), "--bundle", str(bundle),
               "--pid-file", str(bundle / "pid"), "--file-locks", "--manage-cgroups-mode", "ignore", cid]
        try:
            _settle()
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w)
            rc = proc.wait()
            elapsed = time.perf_counter() - t
        finally:
            os.close(out_w)
            os.close(err_w)
        if rc != 0:
            log = (bundle / "runc.log").read_text(errors="replace")[-2000:] if (bundle / "runc.log").exists() else ""
            criu = (bundle / "restore.log").read_text(errors="replace").splitlines()[-30:] \
                if (bundle / "restore.log").exists() else []
            raise RuntimeError(f"bare `{' '.join(cmd)}` failed ({rc}):\n{log}\nrestore.log:\n" + "\n".join(criu))
        return elapsed, diff_apply, cgroups_path

    def remove(self, cid: str) -> None:
        bundle, cgroups_path, fds = self.ids.pop(cid)
        pids = cgroups.processes(cgroups_path)
        if self.runc("state", cid, check=False).returncode == 0:
            self.runc("kill", "--all", cid, "KILL", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                state = self.runc("state", cid, check=False)
                if state.returncode != 0 or json.loads(state.stdout)["status"] == "stopped":
                    break
                time.sleep(0.02)
            self.runc("delete", "--force", cid, check=False)
        # In the pod's PID namespace the killed processes are reaped by the pod's infra process: wait
        # until they are gone, or the next restore into this pod finds its PIDs taken.
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        for fd in fds:
            os.close(fd)
        mounts.unmount(bundle / "rootfs")
        _remove_cgroup(cgroups_path)
        shutil.rmtree(bundle, ignore_errors=True)

    def remove_all(self) -> None:
        for cid in list(self.ids):
            self.remove(cid)
        if self.root.is_dir():
            for cid in self.runc("list", "-q", check=False).stdout.split():
                self.runc("delete", "--force", cid, check=False)


class RestoreBench:
    def __init__(self, client, daemon: Daemon, settings: DaemonSettings, image: str, registry: str):
        self.client = client
        self.registry = registry
        self.daemon = daemon
        self.settings = settings
        self.image = image
        self.pods: set[str] = set()
        self.archives = settings.base / "archives"
        self.archives.mkdir(mode=0o700)
        self.logs = settings.base / "pod-logs"
        self.bare = BareRunc(settings.base / "bare")

    # ---- helpers -------------------------------------------------------------------------------

    def new_pod(self, name: str, hostname: str | None = None):
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, namespace="default", uid=uuid.uuid4().hex, attempt=0),
            hostname=hostname or name, log_directory=str(self.logs / f"{name}-{uuid.uuid4().hex[:6]}"))
        pod_id = self.client.run_pod(config)
        self.pods.add(pod_id)
        return config, pod_id

    def remove_pod(self, pod_id: str) -> None:
        self.client.stop_pod(pod_id)
        self.client.remove_pod(pod_id)
        self.pods.discard(pod_id)

    def container_spec(self, cid: str) -> dict:
        return json.loads((self.settings.root / "containers" / cid / "config.json").read_text())

    def checkpoint(self, cid: str, archive: Path) -> float:
        t = time.perf_counter()
        self.client.runtime.CheckpointContainer(cri.CheckpointContainerRequest(
            container_id=cid, location=str(archive), timeout=600), timeout=660)
        return time.perf_counter() - t

    def restored_log_line(self, cid: str) -> dict:
        deadline = time.monotonic() + 5
        while True:
            for line in self.daemon.log_path.read_text(errors="replace").splitlines():
                if '"container restored"' in line and cid in line:
                    doc = json.loads(line)
                    if doc.get("container") == cid:
                        return doc
            if time.monotonic() > deadline:
                raise RuntimeError(f"no 'container restored' log line for {cid}:\n{self.daemon.log_tail()}")
            time.sleep(0.05)

    def checkpoint_image(self, archive: Path, size_mib: int) -> tuple[str, float]:
        """The archive as a checkpoint image in the registry, pulled by the daemon (PullImage, which
        unpacks its CRIU images into the store); returns its tag and the pull's seconds."""
        tag = f"{self.registry}/checkpoints/hold-{size_mib}-{uuid.uuid4().hex[:6]}:v1"
        root = str(self.settings.root)
        for args in (("build", str(archive), "--tag", tag, "--root", root), ("push", tag, "--root", root)):
            done = subprocess.run([sys.executable, "-m", "pyshim", "checkpoint-image", *args], capture_output=True,
                                  text=True, timeout=1200)
            if done.returncode != 0:
                raise RuntimeError(f"pyshim checkpoint-image {args[0]} failed: {done.stderr}")
        self.client.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=tag)), timeout=600)
        _settle()
        t = time.perf_counter()
        self.client.pull(tag)
        return tag, time.perf_counter() - t

    def remove_image(self, tag: str) -> None:
        self.client.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=tag)), timeout=600)

    def restore(self, archive: Path | str, pod_name: str):
        """A new pod, CreateContainer naming the archive, StartContainer. Returns the pod, the container,
        CreateContainer and StartContainer seconds, and the perf_counter instant the restore began
        (StartContainer's start minus CreateContainer's duration: the writeback settling between the
        two calls is not counted)."""
        pod, pod_id = self.new_pod(pod_name, hostname=HOSTNAME)
        t = time.perf_counter()
        cid = self.client.create(pod_id, container_config(str(archive), [], name="main", log_path="main.log"), pod)
        create_s = time.perf_counter() - t
        _settle()
        t = time.perf_counter()
        self.client.start(cid)
        start_s = time.perf_counter() - t
        return pod_id, cid, create_s, start_s, t - create_s

    # ---- 1. memory-holding containers ------------------------------------------------------------

    def memory(self, size_mib: int, runs: int) -> MemoryRow:
        row = MemoryRow(size_mib, runs)
        archive = self.archives / f"hold-{size_mib}.tar"
        pod, pod_id = self.new_pod(f"hold-{size_mib}")
        cid = self.client.create(pod_id, container_config(
            self.image, ["sh", "-c", HOLD.format(size=size_mib * MIB)], name="hold", log_path="hold.log"), pod)
        self.client.start(cid)
        row.source_rss_kib = wait_for_holder(self.container_spec(cid)["linux"]["cgroupsPath"], size_mib)
        row.checkpoint_s = self.checkpoint(cid, archive)
        row.archive_mib = archive.stat().st_size / MIB
        self.remove_pod(pod_id)

        size_dir = self.bare.work / f"{size_mib}"
        tag = ""
        try:
            images, diff, deleted, row.bare_extract_s, row.uts_rewrite_s = self.bare.prepare(archive, size_dir)
            tag, row.pull_s = self.checkpoint_image(archive, size_mib)
            for i in range(runs):
                # From the archive path: first (a new ctime makes the store unpack the file again), second.
                os.utime(archive)
                for times, phases, kind in ((row.first_s, row.first_phases, "first"),
                                            (row.second_s, row.second_phases, "second")):
                    pod_id, cid, _, start_s, _ = self.restore(archive, f"restore-{kind}-{size_mib}-{i}")
                    times.append(start_s)
                    phases.append(self.restored_log_line(cid)["ms"])
                    self.remove_pod(pod_id)
                pod_id, cid, create_s, start_s, _ = self.restore(tag, f"restore-{size_mib}-{i}")
                row.create_s.append(create_s)
                row.start_s.append(start_s)
                row.phases.append(self.restored_log_line(cid)["ms"])
                spec = self.container_spec(cid)
                row.restored_rss_kib.append(_holder_rss_kib(spec["linux"]["cgroupsPath"]))
                lowerdirs = list(reversed(mounts.overlay_lower_dirs(self.settings.root / "containers" / cid / "rootfs")))
                # The bare restore takes the pod's namespaces (and PIDs) once pyshim's container is gone.
                self.client.stop(cid, timeout=0)
                self.client.remove(cid)
                bare_id = f"bare-{size_mib}-{i}"
                try:
                    bare_s, diff_s, bare_cgroup = self.bare.restore(bare_id, spec, lowerdirs, images, diff, deleted,
                                                                    size_dir / f"b{i}")
                    row.bare_s.append(bare_s)
                    row.bare_diff_apply_s.append(diff_s)
                    row.bare_rss_kib.append(_holder_rss_kib(bare_cgroup))
                finally:
                    self.bare.remove(bare_id)
                self.remove_pod(pod_id)
        finally:
            shutil.rmtree(size_dir, ignore_errors=True)
            archive.unlink(missing_ok=True)
            if tag:
                self.remove_image(tag)
        return row

    # ---- 2. slow-starting service -------------------------------------------------------------------

    def first_answer(self, ip: str, since: float, timeout: float) -> tuple[float, str]:
        deadline = since + timeout
        while time.perf_counter() < deadline:
            try:
                with socket.create_connection((ip, SERVICE_PORT), timeout=2) as s:
                    data = b""
                    while chunk := s.recv(4096):
                        data += chunk
                if data.startswith(b"ready"):
                    return time.perf_counter() - since, data.decode().strip()
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"no answer from {ip}:{SERVICE_PORT} within {timeout}s")

    def slow_app(self, init_s: float, runs: int) -> SlowRow:
        row = SlowRow(init_s, runs)
        script = SLOW_SERVICE.format(centis=int(init_s * 100), port=SERVICE_PORT)
        archive = self.archives / "slow.tar"
        try:
            for i in range(runs):
                pod, pod_id = self.new_pod(f"slow-cold-{i}")
                ip = self.client.pod_status(pod_id).status.network.ip
                _settle()
                t = time.perf_counter()
                cid = self.client.create(pod_id, container_config(self.image, ["sh", "-c", script], name="svc",
                                                                  log_path="svc.log"), pod)
                self.client.start(cid)
                elapsed, answer = self.first_answer(ip, t, init_s * 6 + 60)
                row.cold_first_answer_s.append(elapsed)
                if i == 0:
                    row.cold_answer = answer
                    time.sleep(0.5)  # the per-connection nc child has exited: only the listener is dumped
                    row.checkpoint_s = self.checkpoint(cid, archive)
                self.remove_pod(pod_id)
            for i in range(runs):
                pod_id, cid, _, start_s, t = self.restore(archive, f"slow-restore-{i}")
                ip = self.client.pod_status(pod_id).status.network.ip
                elapsed, answer = self.first_answer(ip, t, 120)
                row.restore_first_answer_s.append(elapsed)
                row.restore_start_s.append(start_s)
                row.restored_answers.append(answer)
                self.remove_pod(pod_id)
        finally:
            archive.unlink(missing_ok=True)
        return row

    def cleanup(self) -> None:
        self.bare.remove_all()
        for pod_id in list(self.pods):
            try:
                self.remove_pod(pod_id)
            except Exception as e:  # noqa: BLE001 - clean up as much as possible
                print(f"cleanup: pod {pod_id}: {e}")
        shutil.rmtree(self.archives, ignore_errors=True)


# ---- report ----------------------------------------------------------------------------------------

def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def report(memory_rows: list[MemoryRow], slow: SlowRow | None) -> str:
    out = []
    if memory_rows:
        out.append("Restore of memory-holding containers (medians; ms unless noted)")
        rows = []
        for r in memory_rows:
            start, bare = _median(r.start_s), _median(r.bare_s)
            diff = r.phase("unpack_rootfs_diff")
            met = start <= r.target_s
            rows.append([
                f"{r.size_mib}", f"{r.runs}", f"{r.source_rss_kib / 1024:.1f}",
                f"{_median(r.restored_rss_kib) / 1024:.1f}/{_median(r.bare_rss_kib) / 1024:.1f}",
                f"{r.archive_mib:.0f}", f"{_ms(_median(r.create_s))}", f"{_ms(start)}", f"{_ms(bare)}",
                f"{_ms(diff)}", f"{start / bare:.2f}x",
                f"{start / (r.bare_extract_s + bare + _median(r.bare_diff_apply_s)):.2f}x", f"{_ms(r.target_s)}",
                f"{'met' if met else 'MISSED'} ({start / r.target_s:.2f} of target)"])
        out.append(_table(["MiB", "runs", "src VmRSS MiB", "restored VmRSS MiB pyshim/bare", "archive MiB",
                           "CreateContainer", "StartContainer", "bare runc restore", "diff apply",
                           "Start/bare", "Start/(tar -x+bare+diff)", "target 1.1xbare+diff", "target"], rows))
        out.append("")
        out.append("Issue 13: StartContainer by checkpoint source, next to bare runc restore (medians, ms)")
        rows = []
        for r in memory_rows:
            bare = _median(r.bare_s)
            image, first, second = _median(r.start_s), _median(r.first_s), _median(r.second_s)
            rows.append([f"{r.size_mib}", f"{_ms(bare)}", f"{_ms(r.phase('unpack_rootfs_diff'))}",
                         f"{_ms(image)}", f"{image / bare:.2f}x",
                         f"{'met' if image <= r.target_s else 'MISSED'} (<= {_ms(r.target_s)})",
                         f"{_ms(first)}", f"{first / bare:.2f}x", f"{_ms(r.bare_extract_s)}",
                         f"{'met' if first <= r.first_target_s else 'MISSED'} (<= {_ms(r.first_target_s)})",
                         f"{_ms(second)}", f"{second / bare:.2f}x", f"{_ms(r.pull_s)}"])
        out.append(_table(["MiB", "bare runc restore", "diff apply", "pulled image", "image/bare",
                           "target 1.1xbare+diff", "archive 1st", "1st/bare", "copy (tar -x)",
                           "target +copy", "archive 2nd", "2nd/bare", "PullImage (untimed)"], rows))
        out.append("(phases of the archive restores, criu_images_unpack = unpacking into the store: "
                   + "; ".join(f"{r.size_mib} MiB 1st {_ms(_median([p.get('unpack_criu_images_unpack', 0) for p in r.first_phases]) / 1000)}"
                               f" 2nd {_ms(_median([p.get('unpack_criu_images_unpack', 0) for p in r.second_phases]) / 1000)}"
                               for r in memory_rows) + ")")
        out.append("")
        out.append("Where StartContainer's time goes (daemon log 'container restored', medians, ms)"
                   " and the bare side's untimed preparation")
        names = ["rootfs", "unpack", "unpack_criu_images", "unpack_rootfs_diff", "spec", "runc_restore"]
        rows = []
        for r in memory_rows:
            unpack_rest = _median([p["unpack"] - p.get("unpack_criu_images", 0)
                                   - p.get("unpack_rootfs_diff", 0) for p in r.phases]) / 1000
            in_phases = sum(r.phase(n) for n in ("rootfs", "unpack", "spec", "runc_restore"))
            rows.append([f"{r.size_mib}", *[f"{_ms(r.phase(n))}" for n in names], f"{_ms(unpack_rest)}",
                         f"{_ms(_median(r.start_s) - in_phases)}", f"{_ms(r.bare_extract_s)}",
                         f"{_ms(r.uts_rewrite_s)}", f"{_ms(_median(r.bare_diff_apply_s))}",
                         f"{_ms(r.checkpoint_s)}"])
        out.append(_table(["MiB", *names, "unpack: rest (log copy, close)", "rest of call",
                           "bare: tar -x checkpoint/", "bare: UTS rewrite", "bare: diff apply",
                           "CheckpointContainer"], rows))
        out.append("('rest of call': StartContainer's wall time outside the logged phases -- gRPC, the archive "
                   "re-checked by plan(), base image lookup, status refresh)")
        out.append("")
        out.append("Per run, in order (ms): pyshim StartContainer (its runc_restore phase) | bare runc restore")
        for r in memory_rows:
            pairs = [f"{_ms(s)} ({p.get('runc_restore', float('nan')):.1f})" for s, p in zip(r.start_s, r.phases)]
            out.append(f"  {r.size_mib:>5} MiB: {', '.join(pairs)} | {', '.join(str(_ms(b)) for b in r.bare_s)}")
    if slow is not None:
        cold, restored = _median(slow.cold_first_answer_s), _median(slow.restore_first_answer_s)
        same = all(a == slow.cold_answer for a in slow.restored_answers)
        out.append("")
        out.append(f"Slow-starting service (~{slow.init_s:g} s of initialisation; from CreateContainer to the first "
                   f"answer over TCP from the host to the pod IP; medians of {slow.runs})")
        out.append(_table(
            ["cold start s", "after restore s", "restore StartContainer ms", "speed-up", "target >=10x",
             "same state served"],
            [[f"{cold:.3f}", f"{restored:.3f}", f"{_ms(_median(slow.restore_start_s))}", f"{cold / restored:.1f}x",
              "met" if cold / restored >= 10 else "MISSED", "yes" if same else f"NO: {slow.restored_answers}"]]))
        out.append(f"per run (s): cold {[round(x, 3) for x in slow.cold_first_answer_s]}, "
                   f"after restore {[round(x, 3) for x in slow.restore_first_answer_s]}")
        out.append(f"cold answer: {slow.cold_answer!r}; checkpoint took {_ms(slow.checkpoint_s)} ms")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--big-runs", type=int, default=None, help="runs for sizes >= 1024 MiB (default: --runs)")
    parser.add_argument("--sizes", default="16,256,1024", help="MiB held by the container, comma-separated")
    parser.add_argument("--init-seconds", type=float, default=10.0)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-slow", action="store_true")
    args = parser.parse_args()
    sizes = [] if args.skip_memory else [int(s) for s in args.sizes.split(",") if s]
    load_before = os.getloadavg()[0]
    settings = new_settings("rbench", "10.86.41.0/24")
    daemon = Daemon(settings)
    memory_rows: list[MemoryRow] = []
    slow = None
    found: list[str] = []
    with RegistryServer() as registry:
        image = push_busybox(registry.address)
        daemon.start()
        try:
            with daemon.client(timeout=600) as client:
                client.pull(image)
                bench = RestoreBench(client, daemon, settings, image, registry.address)
                try:
                    for size in sizes:
                        runs = args.big_runs if args.big_runs and size >= 1024 else args.runs
                        memory_rows.append(bench.memory(size, runs))
                    if not args.skip_slow:
                        slow = bench.slow_app(args.init_seconds, args.runs)
                except Exception:
                    print(f"daemon log ({daemon.log_path}):\n{daemon.log_tail(60)}")
                    raise
                finally:
                    bench.cleanup()
        finally:
            daemon.stop()
            found = leftovers(settings)
            discard(settings)
    print(report(memory_rows, slow))
    print(f"\nload average (1 min) at start {load_before:.2f}, at end {os.getloadavg()[0]:.2f}, "
          f"on {os.cpu_count()} CPUs")
    print(f"\nleft behind: {found or 'nothing'}")


if __name__ == "__main__":
    main()
