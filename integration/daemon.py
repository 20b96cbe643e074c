"""Start a real pyshim daemon on a temporary socket and root, as the tests and benchmarks need."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cri_api import api_pb2 as cri
from pyshim.client import Client
from pyshim.internal import cgroups
from pyshim.internal.crashpoints import ENV as CRASH_ENV


@dataclass
class DaemonSettings:
    base: Path
    bridge: str
    subnet: str
    netns_prefix: str
    # Registries the daemon may reach over plain HTTP though they are not on loopback.
    insecure_registries: tuple[str, ...] = ()
    # Registry host -> mirror hosts (images.mirrors).
    mirrors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Put before `python -m pyshim serve`, e.g. ("nsenter", "--net=/run/netns/NODE") to run the
    # daemon in a node's network namespace (not `ip netns exec`: it remounts /sys, which hides
    # the cgroup mounts from runc).
    command_prefix: tuple[str, ...] = ()

    @property
    def socket(self) -> Path:
        return self.base / "pyshim.sock"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def config_file(self) -> Path:
        return self.base / "pyshim.toml"

    @property
    def cgroup_parent(self) -> str:
        return f"/{self.netns_prefix.rstrip('-')}"

    def write_config(self) -> None:
        images = f'\n[images]\ninsecure_registries = {json.dumps(list(self.insecure_registries))}\n'
        if self.mirrors:
            images += "\n[images.mirrors]\n" + "".join(
                f"{json.dumps(registry)} = {json.dumps(list(hosts))}\n" for registry, hosts in self.mirrors.items())
        self.config_file.write_text(
            f'cgroup_parent = "{self.cgroup_parent}"\n\n'
            f'[network]\nname = "{self.netns_prefix}net"\nbridge = "{self.bridge}"\n'
            f'subnet = "{self.subnet}"\nnetns_prefix = "{self.netns_prefix}"\n' + images)


class Daemon:
    """A `pyshim serve` process; its stderr (JSON logs) goes to a file beside its root."""

    def __init__(self, settings: DaemonSettings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.log_path = settings.base / "daemon.log"

    def start(self, timeout: float = 30, crash_at: str = "") -> None:
        """Start and wait until it serves. `crash_at` names a crash point (pyshim/internal/crashpoints.py)
        at which the daemon will SIGKILL itself: see `wait_crashed`. A daemon of ours that still runs is
        stopped first: two on one socket would leave the first one, and its containers, orphaned."""
        self.stop()
        s = self.settings
        s.base.mkdir(parents=True, exist_ok=True)
        s.write_config()
        cmd = [*s.command_prefix, sys.executable, "-m", "pyshim", "serve", "--config", str(s.config_file), "--socket", str(s.socket),
               "--root", str(s.root), "--state-dir", str(s.state_dir), "--log-level", "debug"]
        with open(self.log_path, "ab") as log:
            env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
            if crash_at:
                env[CRASH_ENV] = crash_at
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pyshim exited with {self.process.returncode}:\n{self.log_tail()}")
            if s.socket.exists():
                try:
                    with self.client(timeout=2) as c:
                        c.version()
                    return
                except Exception:  # noqa: BLE001 - not serving yet
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"pyshim did not serve within {timeout}s:\n{self.log_tail()}")

    def client(self, timeout: float = 120) -> Client:
        return Client(f"unix://{self.settings.socket}", timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def wait_crashed(self, timeout: float = 60) -> None:
        """Wait for the daemon to kill itself at its crash point; fail if it exits otherwise or lives on."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon did not reach its crash point within {timeout}s:\n"
                                 f"{self.log_tail()}") from None
        if code != -signal.SIGKILL:
            raise AssertionError(f"the daemon exited with {code}, not at its crash point:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no daemon log)"

    def _status_kib(self, field: str) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
        return 0

    @property
    def rss_kib(self) -> int:
        return self._status_kib("VmRSS")

    @property
    def hwm_kib(self) -> int:
        """Peak RSS (VmHWM) since start or since the last reset_peak_rss()."""
        return self._status_kib("VmHWM")

    def reset_peak_rss(self) -> None:
        """Set VmHWM back to the current RSS (clear_refs 5), to measure the peak of one call."""
        with open(f"/proc/{self.process.pid}/clear_refs", "w") as f:
            f.write("5")


def leftovers(settings: DaemonSettings) -> list[str]:
    """What a daemon has left on the machine: mounts under its dirs, runc containers, netns, conmon processes."""
    found = []
    base = str(settings.base)
    with open("/proc/mounts") as f:
        found += [f"mount {line.split()[1]}" for line in f if line.split()[1].startswith(base)]
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir():
        found += [f"netns {p.name}" for p in netns_dir.iterdir() if p.name.startswith(settings.netns_prefix)]
    runc_root = settings.state_dir / "runc"
    if runc_root.is_dir():
        out = subprocess.run(["runc", "--root", str(runc_root), "list", "-q"], capture_output=True, text=True).stdout
        found += [f"runc container {line}" for line in out.split()]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"conmon") and any(base.encode() in a for a in cmdline):
            found.append(f"conmon process {proc.name}")
    found += [f for f in sandbox_leftovers(settings) if not f.startswith("netns ")]  # netns: listed above
    return found


def ip_allocations(settings: DaemonSettings, known_sandboxes: set[str] = frozenset()) -> list[str]:
    """host-local allocation files of the daemon's network whose owner is not a known sandbox."""
    network_dir = settings.root / "cni" / "networks" / f"{settings.netns_prefix}net"
    if not network_dir.is_dir():
        return []
    found = []
    for path in network_dir.iterdir():
        if path.name == "lock" or path.name.startswith("last_reserved_ip."):
            continue
        owner = path.read_text(errors="replace").splitlines()[0].strip() if path.stat().st_size else ""
        if owner not in known_sandboxes:
            found.append(f"IP allocation {path.name} of {owner!r}")
    return found


def cni_cache_entries(settings: DaemonSettings, known_sandboxes: set[str] = frozenset()) -> list[str]:
    cache = settings.root / "cni" / "cache"
    if not cache.is_dir():
        return []
    return [f"CNI cache entry {p.name}" for p in cache.iterdir() if p.name.removesuffix(".json") not in known_sandboxes]


def sandbox_dirs(settings: DaemonSettings, known_sandboxes: set[str] = frozenset()) -> list[str]:
    """Pod files dirs and pinned-namespace dirs of no known sandbox."""
    found = []
    for base in (settings.root / "sandboxes", settings.state_dir / "sandboxes"):
        if base.is_dir():
            found += [f"sandbox dir {p}" for p in base.iterdir() if p.name not in known_sandboxes]
    return found


def pod_netns(settings: DaemonSettings, known_sandboxes: set[str] = frozenset()) -> list[str]:
    """Network namespaces with the daemon's prefix of no known sandbox (named <prefix><id[:16]>)."""
    netns_dir = Path("/run/netns")
    if not netns_dir.is_dir():
        return []
    owned = {f"{settings.netns_prefix}{i[:16]}" for i in known_sandboxes}
    return [f"netns {p.name}" for p in netns_dir.iterdir()
            if p.name.startswith(settings.netns_prefix) and p.name not in owned]


def pod_cgroups(settings: DaemonSettings, known_sandboxes: set[str] = frozenset()) -> list[str]:
    """cgroups directly under the daemon's cgroup parent (in any hierarchy) of no known sandbox."""
    rel = settings.cgroup_parent.strip("/")
    return sorted({f"cgroup {settings.cgroup_parent}/{p.name}" for p in Path("/sys/fs/cgroup").glob(f"*/{rel}/*")
                   if p.is_dir() and p.name not in known_sandboxes})


def pid_infra_processes(settings: DaemonSettings, known_sandboxes: set[str] = frozenset()) -> list[str]:
    """Pid infra launchers (`unshare ... pyshim-pid-infra <pin dir>/pid-infra.pid`) of no known sandbox."""
    pin_root = str(settings.state_dir / "sandboxes") + "/"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if "pyshim-pid-infra" in argv and argv[-1].startswith(pin_root) \
                and Path(argv[-1]).parent.name not in known_sandboxes:
            found.append(f"pid infra process {proc.name} of {Path(argv[-1]).parent.name}")
    return found


def portmap_rules(settings: DaemonSettings, known_sandboxes: set[str] = frozenset()) -> list[str]:
    """portmap's DNAT rules of the daemon's network (commented `dnat name: "<net>" id: "<sandbox>"`)."""
    out = subprocess.run(["iptables", "-t", "nat", "-S", "CNI-HOSTPORT-DNAT"], capture_output=True, text=True).stdout
    marker = f'dnat name: \\"{settings.netns_prefix}net\\" id: \\"'
    found = []
    for line in out.splitlines():
        if marker in line:
            owner = line.split(marker, 1)[1].split("\\", 1)[0]
            if owner not in known_sandboxes:
                found.append(f"portmap rule of {owner}")
    return found


def sandbox_leftovers(settings: DaemonSettings, known_sandboxes: set[str] = frozenset()) -> list[str]:
    """What pod sandboxes left on the machine that no known sandbox owns."""
    return [*ip_allocations(settings, known_sandboxes), *cni_cache_entries(settings, known_sandboxes),
            *sandbox_dirs(settings, known_sandboxes), *pod_netns(settings, known_sandboxes),
            *pod_cgroups(settings, known_sandboxes), *pid_infra_processes(settings, known_sandboxes),
            *portmap_rules(settings, known_sandboxes)]


def image_store_leftovers(settings: DaemonSettings) -> list[str]:
    """Partial downloads in the image store's tmp/, and blobs that no recorded image references."""
    store = settings.root / "images"
    found = [f"image store temp file {p}" for p in (store / "tmp").glob("*")] if (store / "tmp").is_dir() else []
    try:
        images = json.loads((store / "images.json").read_text()).get("images", {})
    except FileNotFoundError:
        images = {}

    def blob(digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        return store / "blobs" / algorithm / hexpart

    used = set()
    for entry in images.values():
        manifest = json.loads(blob(entry["manifest_digest"]).read_text())
        used |= {entry["manifest_digest"], manifest["config"]["digest"], *(d["digest"] for d in manifest["layers"])}
    for path in (store / "blobs").glob("*/*"):
        if f"{path.parent.name}:{path.name}" not in used:
            found.append(f"unreferenced blob {path.parent.name}:{path.name}")
    return found


def remove_everything(client) -> tuple[list, list]:
    """Remove every container and pod a daemon has; returns what was there (pods, containers)."""
    pods = list(client.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items)
    containers = list(client.runtime.ListContainers(cri.ListContainersRequest()).containers)
    for ctr in containers:
        client.remove(ctr.id)
    for pod in pods:
        client.stop_pod(pod.id)
        client.remove_pod(pod.id)
    return pods, containers


def remove_cgroup_tree(cgroup_parent: str) -> list[str]:
    """Remove a daemon's cgroup parent in every hierarchy (empty cgroups only); returns what remains."""
    cgroups.remove(cgroup_parent)
    rel = cgroup_parent.strip("/")
    return [str(b) for b in Path("/sys/fs/cgroup").glob(f"*/{rel}")] if rel else []


# ---- what a crash may leave of containers (integration/test_crash_containers.py) ---------------

def container_dirs_without_record(settings: DaemonSettings, recorded_ids: set[str]) -> list[str]:
    """Container directories under the root that no container the daemon lists owns."""
    containers = settings.root / "containers"
    return [f"container dir {p.name}" for p in containers.iterdir()
            if p.name not in recorded_ids] if containers.is_dir() else []


def frozen_cgroups(settings: DaemonSettings) -> list[str]:
    """Freezer cgroups under the daemon's cgroup parent that are (being) frozen."""
    base = Path("/sys/fs/cgroup/freezer") / settings.cgroup_parent.strip("/")
    found = []
    for state in base.rglob("freezer.state") if base.is_dir() else []:
        if state.read_text().strip() != "THAWED" and state.parent != base:
            found.append(f"frozen cgroup {state.parent}")
    return found


def checkpoint_work_dirs(settings: DaemonSettings) -> list[str]:
    work = settings.root / "checkpoint-work"
    return [f"checkpoint work dir {p.name}" for p in work.iterdir()] if work.is_dir() else []


def archive_temp_files(directory: Path) -> list[str]:
    """Hidden temporary archives beside checkpoint locations."""
    return [f"archive temp file {p.name}" for p in Path(directory).glob(".*.tmp")]


def unowned_container_cgroups(settings: DaemonSettings, recorded_ids: set[str]) -> list[str]:
    """Container cgroups (<parent>/<pod id>/<container id>) with no listed container."""
    base = Path("/sys/fs/cgroup/freezer") / settings.cgroup_parent.strip("/")
    if not base.is_dir():
        return []
    return [f"container cgroup {p}" for p in base.glob("*/*") if p.is_dir() and p.name not in recorded_ids]


# Set to a directory to keep each test daemon's last log there (a failed run's evidence); unset,
# tests write nothing outside their own temporary directories.
KEEP_LOGS_ENV = "PYSHIM_TEST_KEEP_LOGS"


def keep_daemon_log(settings: DaemonSettings) -> None:
    keep = os.environ.get(KEEP_LOGS_ENV)
    log = settings.base / "daemon.log"
    if keep and log.exists():
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(log, Path(keep) / f"pyshim-last-{settings.base.name.split('-')[1]}-daemon.log")
