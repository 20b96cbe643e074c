"""Start a real pyshim daemon on a temporary socket and root, as the tests and benchmarks need."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
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
        self.config_file.write_text(
            f'cgroup_parent = "{self.cgroup_parent}"\n\n'
            f'[network]\nname = "{self.netns_prefix}net"\nbridge = "{self.bridge}"\n'
            f'subnet = "{self.subnet}"\nnetns_prefix = "{self.netns_prefix}"\n'
            + (f'\n[images]\ninsecure_registries = {json.dumps(list(self.insecure_registries))}\n'
               if self.insecure_registries else ""))


class Daemon:
    """A `pyshim serve` process; its stderr (JSON logs) goes to a file beside its root."""

    def __init__(self, settings: DaemonSettings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.log_path = settings.base / "daemon.log"

    def start(self, timeout: float = 30, crash_at: str = "") -> None:
        """Start and wait until it serves. `crash_at` names a crash point (pyshim/internal/crashpoints.py)
        at which the daemon will SIGKILL itself: see `wait_crashed`."""
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
