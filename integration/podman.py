"""Podman 5 (Debian trixie) as a real producer of checkpoint archives, kept apart from everything
else on the machine.

    from integration.podman import Podman, available

    ok = available()
    if not ok:
        pytest.skip(ok.reason)
    with Podman() as podman:                       # a private /tmp/pyshim-podman-XXXX
        cid = podman.run_counter(busybox_ref)      # pulls it (plain HTTP allowed), waits for ticks
        archive = podman.checkpoint_export(cid, tmp_path / "ctr.tar.zst", compress="zstd")
        value = podman.last_tick(cid)              # the counter's last logged value
    # leaving the block removed containers, images, cgroups, mounts and the directory

run_counter() runs COUNTER_SCRIPT: it writes ADDED_FILE, deletes DELETED_FILE (both before the
first tick), then every 0.1 s writes the counter to COUNTER_FILE and logs "tick N". By default
checkpoint_export() stops the container, as `podman container checkpoint` does; the archive
then holds it in the state of its last tick (COUNTER_FILE holds last_tick() or, frozen between
the two echoes, last_tick() + 1).

How Podman is set up, and why:
- Storage, state and config are private: `--root`, `--runroot`, `--tmpdir` and
  `--network-config-dir` under the base directory, plus CONTAINERS_CONF, CONTAINERS_STORAGE_CONF,
  CONTAINERS_REGISTRIES_CONF and REGISTRY_AUTH_FILE pointing at files there, so neither
  /etc/containers, /var/lib/containers nor the pyshim daemons' state is read or written.
  Podman still creates the empty directory /run/containers/networks (netavark's run directory
  for root is compiled in); with `--network none` nothing is ever put in it.
- Image copies (`podman pull`) run in a private mount namespace with a tmpfs over /var/lib:
  containers/image keeps its blob info cache in /var/lib/containers/cache for root whatever
  --root says (Podman 5.4 sets no BlobInfoCacheDir and has no option for it), and would create
  /var/lib/containers on a machine that never had it. A pull mounts nothing that must outlive
  it, so the namespace (and the cache) goes away with the command.
- `--storage-driver overlay`, or vfs where the base directory cannot hold overlay layers.
- No systemd: `--cgroup-manager cgroupfs` (each instance has its own cgroup parent,
  /pyshim-podman-XXXX, removed by close()), `--events-backend file`, log driver k8s-file (so
  the archive carries the log as ctr.log), file locks instead of /dev/shm/libpod_lock.
- Runtime runc 1.1.5 from Debian, through a two-line wrapper named `runc` that adds
  `--root <base>/runc`: otherwise Podman's containers land in runc's default root (/run/runc).
  `--runtime-flag root=...` is not enough: conmon's exit command (`podman container cleanup`)
  does not pass runtime flags on. The archives still say `"runtime": "runc"`.
- conmon is Debian's from PATH, the one pyshim uses; CRIU is the system's (4.2.1).
- `podman container restore --import` has no --cgroup-parent: a restored container and its conmon
  land in Podman's default parent, /libpod_parent, which this instance removes with the rest
  when it was not there before (cgroups of another Podman on the machine are left alone).
- `--network none`: runc gives the container a private network namespace holding only `lo`,
  which CRIU dumps and restores by itself; no netavark, bridge, firewall rule or /run/netns
  entry is created, so nothing can leak or collide with pyshim's CNI networks, and the archive
  has no IP address that a restore would have to match. (`--network host` would checkpoint the
  host's network namespace as the container's, which no restore into a pod could honour.)
- Images are pulled with `--tls-verify=false` and a throwaway insecureAcceptAnything policy
  (the tests' registry is plain HTTP on 127.0.0.1).
- PODMAN_IGNORE_CGROUPSV1_WARNING=1: Podman 5 warns on every call that cgroup v1 is deprecated.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

PODMAN = "podman"
DEFAULT_CGROUP_PARENT = "/libpod_parent"  # Podman's with cgroupfs, for containers it restores
MIN_VERSION = (5, 0)
COMMAND_TIMEOUT = 180.0
COMPRESSIONS = ("none", "gzip", "zstd")

# The counter: a new file and a deleted image file before the first tick, then a tick every 0.1 s
# both in COUNTER_FILE and on stdout.
ADDED_FILE = "/root/added-before-checkpoint"
ADDED_CONTENT = "added before checkpoint\n"
DELETED_FILE = "/etc/group"  # in the busybox test image (integration/testimage.py)
COUNTER_FILE = "/tmp/counter"
COUNTER_SCRIPT = (f"echo '{ADDED_CONTENT.strip()}' > {ADDED_FILE}; rm {DELETED_FILE}; "
                  f"i=0; while true; do echo $i > {COUNTER_FILE}; echo tick $i; "
                  "i=$((i+1)); sleep 0.1; done")
COUNTER_COMMAND = ("sh", "-c", COUNTER_SCRIPT)
_TICK = re.compile(r"^tick (\d+)$", re.M)


# Subcommands that copy images (containers/image's copy.Image, hence its blob info cache).
COPYING_COMMANDS = ("pull",)


class PodmanError(RuntimeError):
    pass


def _with_private_var_lib(cmd: list[str]) -> list[str]:
    """`cmd` run where /var/lib is an empty tmpfs of its own: nothing it writes there reaches the
    host (see the module docstring)."""
    script = 'mount -t tmpfs -o mode=0755,size=64m pyshim-podman-var-lib /var/lib && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *cmd]


@dataclass(frozen=True)
class Availability:
    """Whether Podman can be used here; false with the reason when not (`pytest.skip(a.reason)`)."""
    ok: bool
    reason: str
    version: str = ""

    def __bool__(self) -> bool:
        return self.ok


def available() -> Availability:
    """Podman >= 5 with runc, conmon and CRIU, run as root. Starts no container."""
    if os.geteuid() != 0:
        return Availability(False, "Podman checkpoints need root")
    if shutil.which(PODMAN) is None:
        return Availability(False, "podman is not installed (scripts/install-system-deps.sh "
                                   "installs podman/trixie)")
    missing = [tool for tool in ("runc", "conmon", "criu") if shutil.which(tool) is None]
    if missing:
        return Availability(False, f"podman needs {', '.join(missing)}, which are not installed")
    try:
        out = subprocess.run([PODMAN, "--version"], capture_output=True, text=True, timeout=30,
                             env=_quiet_env(os.environ)).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Availability(False, f"podman --version failed: {exc}")
    m = re.search(r"version (\d+)\.(\d+)\.(\S+)", out)
    if not m:
        return Availability(False, f"cannot read podman's version from {out.strip()!r}")
    version = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
    if (int(m.group(1)), int(m.group(2))) < MIN_VERSION:
        return Availability(False, f"podman {version} is older than 5.0", version)
    return Availability(True, "", version)


def _quiet_env(base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    env["PODMAN_IGNORE_CGROUPSV1_WARNING"] = "1"
    return env


class Podman:
    """One private Podman installation: its storage, state, runc root and cgroup parent live in
    `base` (a fresh /tmp/pyshim-podman-XXXX unless given) and go away with close().

    Use it as a context manager. All containers run with `--network none`."""

    def __init__(self, base: Path | None = None):
        self.base = Path(base) if base is not None else \
            Path(tempfile.mkdtemp(prefix="pyshim-podman-", dir="/tmp"))
        self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.cgroup_parent = f"/pyshim-podman-{uuid.uuid4().hex[:8]}"
        self.runc = shutil.which("runc") or "/usr/sbin/runc"
        self.storage_driver = "overlay"
        self._netns_before = _netns_names()
        self._owns_default_cgroup_parent = not any(
            (h / DEFAULT_CGROUP_PARENT.lstrip("/")).exists() for h in _cgroup_hierarchies())
        try:
            self._write_config()
            self._choose_storage_driver()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ paths

    @property
    def graph_root(self) -> Path:
        return self.base / "root"

    @property
    def run_root(self) -> Path:
        return self.base / "runroot"

    @property
    def tmp_dir(self) -> Path:
        return self.base / "tmp"

    @property
    def runc_root(self) -> Path:
        return self.base / "runc"

    # ------------------------------------------------------------ the podman command

    def global_flags(self) -> list[str]:
        return ["--root", str(self.graph_root), "--runroot", str(self.run_root),
                "--storage-driver", self.storage_driver, "--tmpdir", str(self.tmp_dir),
                "--network-config-dir", str(self.base / "networks"),
                "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--runtime", "runc"]

    def env(self) -> dict[str, str]:
        env = _quiet_env(os.environ)
        env.update(CONTAINERS_CONF=str(self.base / "containers.conf"),
                   CONTAINERS_STORAGE_CONF=str(self.base / "storage.conf"),
                   CONTAINERS_REGISTRIES_CONF=str(self.base / "registries.conf"),
                   REGISTRY_AUTH_FILE=str(self.base / "auth.json"))
        return env

    def podman(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
               ) -> subprocess.CompletedProcess:
        """Run `podman <private global flags> ARGS`; PodmanError with its stderr if it fails."""
        cmd = [PODMAN, *self.global_flags(), *args]
        if args and args[0] in COPYING_COMMANDS:
            cmd = _with_private_var_lib(cmd)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=self.env(), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise PodmanError(f"podman {' '.join(args)} took longer than {timeout:.0f}s") from None
        if check and proc.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)} failed ({proc.returncode}): "
                              f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    # ------------------------------------------------------------ images and containers

    def pull(self, image_ref: str, tls_verify: bool = False) -> str:
        """Pull image_ref (plain HTTP and self-signed allowed unless tls_verify); its image ID."""
        self.podman("pull", "--quiet", f"--tls-verify={str(tls_verify).lower()}",
                    "--signature-policy", str(self.base / "policy.json"), image_ref)
        return self.image_id(image_ref)

    def image_id(self, image_ref: str) -> str:
        """The local image's ID: its config digest as bare hex (no "sha256:")."""
        return self.podman("image", "inspect", "--format", "{{.Id}}", image_ref).stdout.strip()

    def run_container(self, image_ref: str, command: Sequence[str], name: str | None = None,
                      extra_args: Iterable[str] = ()) -> str:
        """`podman run -d` of image_ref (pulled first if missing); the container ID."""
        if self.podman("image", "exists", image_ref, check=False).returncode != 0:
            self.pull(image_ref)
        name = name or f"podman-{uuid.uuid4().hex[:8]}"
        out = self.podman("run", "--detach", "--pull", "never", "--network", "none",
                          "--cgroup-parent", self.cgroup_parent, "--name", name, *extra_args,
                          image_ref, *command).stdout
        return out.strip().splitlines()[-1]

    def run_counter(self, image_ref: str, name: str | None = None, min_ticks: int = 3,
                    timeout: float = 30.0) -> str:
        """Start the counter (COUNTER_SCRIPT) and wait until it has logged `min_ticks` ticks,
        by when ADDED_FILE exists and DELETED_FILE is gone. Returns the container ID."""
        cid = self.run_container(image_ref, COUNTER_COMMAND, name=name or
                                 f"counter-{uuid.uuid4().hex[:8]}")
        deadline = time.monotonic() + timeout
        while True:
            tick = self.last_tick(cid)
            if tick is not None and tick >= min_ticks - 1:
                return cid
            if time.monotonic() > deadline:
                raise PodmanError(f"counter {cid[:12]} logged no {min_ticks} ticks in "
                                  f"{timeout:.0f}s: {self.logs(cid)[-500:]!r}")
            time.sleep(0.05)

    def logs(self, cid: str) -> str:
        return self.podman("logs", cid).stdout

    def last_tick(self, cid: str) -> int | None:
        """The last "tick N" the counter logged, None before the first."""
        ticks = _TICK.findall(self.logs(cid))
        return int(ticks[-1]) if ticks else None

    def inspect(self, cid: str) -> dict:
        return json.loads(self.podman("container", "inspect", cid).stdout)[0]

    def state(self, cid: str) -> str:
        """Podman's state of the container: running, exited, ..."""
        return self.podman("container", "inspect", "--format", "{{.State.Status}}",
                           cid).stdout.strip()

    def checkpoint_export(self, cid: str, out_path: Path, compress: str = "none", *,
                          leave_running: bool = False, tcp_established: bool = False,
                          file_locks: bool = False) -> Path:
        """`podman container checkpoint --export OUT --compress C`: a Podman 5 checkpoint
        archive (plain tar, tar.gz or tar.zst whatever OUT's name) at out_path (mode 0600).

        The container stops unless leave_running; it stays known to Podman either way until
        remove_all()."""
        if compress not in COMPRESSIONS:
            raise ValueError(f"compress must be one of {COMPRESSIONS}, not {compress!r}")
        args = ["container", "checkpoint", "--export", str(out_path), "--compress", compress]
        if leave_running:
            args.append("--leave-running")
        if tcp_established:
            args.append("--tcp-established")
        if file_locks:
            args.append("--file-locks")
        self.podman(*args, cid)
        return Path(out_path)

    def restore_import(self, archive: Path, name: str | None = None) -> str:
        """`podman container restore --import ARCHIVE` (with --name when given): a container,
        running, restored from a checkpoint archive of any engine; returns its ID. The archive's
        base image must already be in this instance (pull() it): a pull here would copy images
        outside the private /var/lib (see the module docstring)."""
        args = ["container", "restore", "--import", str(archive)]
        if name:
            args += ["--name", name]
        out = self.podman(*args).stdout
        return out.strip().splitlines()[-1]

    def remove_all(self) -> None:
        """Remove every container (killing running ones) and the cgroups they used; images stay."""
        self.podman("rm", "--all", "--force", "--time", "0", check=False)
        self._delete_runc_containers()
        self._wait_for_no_processes()
        self._remove_cgroups()

    def remove_images(self) -> None:
        self.podman("rmi", "--all", "--force", check=False)

    # ------------------------------------------------------------ leftovers and cleanup

    def leftovers(self) -> list[str]:
        """What this instance has on the machine besides files in `base`: mounts under base,
        runc containers in its runc root, processes (conmon, container processes), cgroups,
        network namespaces created since it started. Empty after remove_all()."""
        found = [f"mount {m}" for m in _mounts_under(self.base)]
        found += [f"runc container {c}" for c in self._runc_containers()]
        found += [f"process {pid} ({_comm(pid)})" for pid in self._processes()]
        found += [f"cgroup {d}" for d in self._cgroup_dirs()]
        found += [f"netns {n}" for n in sorted(_netns_names() - self._netns_before)
                  if n.startswith("netns-")]  # Podman's netns names
        return found

    def close(self) -> None:
        """Remove everything: containers, images, then by force whatever is left (processes
        killed by PID, runc state deleted, mounts detached, cgroups removed), then `base`."""
        if not self.base.exists():
            return
        if (self.base / "containers.conf").exists():
            try:
                self.remove_all()
                self.remove_images()
            except PodmanError:
                pass
        for pid in self._processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._delete_runc_containers()
        for mount in sorted(_mounts_under(self.base), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", mount], capture_output=True)
        self._remove_cgroups(wait=5.0)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Podman:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _write_config(self) -> None:
        for d in (self.graph_root, self.run_root, self.tmp_dir, self.runc_root,
                  self.base / "networks", self.base / "bin"):
            d.mkdir(mode=0o700, exist_ok=True)
        wrapper = self.base / "bin" / "runc"
        wrapper.write_text(f'#!/bin/sh\nexec {self.runc} --root {self.runc_root} "$@"\n')
        wrapper.chmod(0o755)
        conmon = shutil.which("conmon") or "/usr/bin/conmon"
        (self.base / "containers.conf").write_text(f"""\
[containers]
log_driver = "k8s-file"
netns = "none"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{self.tmp_dir}/events.log"
lock_type = "file"
tmp_dir = "{self.tmp_dir}"
runtime = "runc"
conmon_path = ["{conmon}"]

[engine.runtimes]
runc = ["{wrapper}"]

[network]
network_config_dir = "{self.base / 'networks'}"
""")
        self._write_storage_conf()
        (self.base / "registries.conf").write_text("unqualified-search-registries = []\n")
        (self.base / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]}) + "\n")

    def _write_storage_conf(self) -> None:
        (self.base / "storage.conf").write_text(f"""\
[storage]
driver = "{self.storage_driver}"
graphroot = "{self.graph_root}"
runroot = "{self.run_root}"
""")

    def _choose_storage_driver(self) -> None:
        probe = self.podman("info", "--format", "{{.Store.GraphDriverName}}", check=False)
        if probe.returncode == 0:
            return
        self.storage_driver = "vfs"  # e.g. base on an overlay or other upper-incapable fs
        self._write_storage_conf()
        self.podman("info", "--format", "{{.Store.GraphDriverName}}")

    def _runc_containers(self) -> list[str]:
        if not self.runc_root.is_dir():
            return []
        out = subprocess.run([self.runc, "--root", str(self.runc_root), "list", "-q"],
                             capture_output=True, text=True).stdout
        return out.split()

    def _delete_runc_containers(self) -> None:
        for cid in self._runc_containers():
            subprocess.run([self.runc, "--root", str(self.runc_root), "delete", "--force", cid],
                           capture_output=True)

    def _cgroup_dirs(self) -> list[Path]:
        """Our cgroup parents in every v1 hierarchy (and v2's), children first."""
        parents = [self.cgroup_parent]
        if self._owns_default_cgroup_parent:
            parents.append(DEFAULT_CGROUP_PARENT)
        found = []
        for hierarchy in _cgroup_hierarchies():
            for parent in parents:
                top = hierarchy / parent.lstrip("/")
                if top.is_dir():
                    found += [Path(d) for d, _, _ in os.walk(top, topdown=False)]
        return found

    def _processes(self) -> set[int]:
        pids = set()
        for d in self._cgroup_dirs():
            try:
                pids |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        needle = (str(self.base).rstrip("/") + "/").encode()  # not a sibling with a longer name
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline:
                pids.add(int(proc.name))
        pids.discard(os.getpid())
        return pids

    def _wait_for_no_processes(self, timeout: float = 15.0) -> None:
        """conmon runs `podman container cleanup` (the exit command) when a container dies; it
        may outlive `podman rm` briefly, and would write into `base` if that went first."""
        deadline = time.monotonic() + timeout
        while self._processes() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _remove_cgroups(self, wait: float = 2.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            busy = []
            for d in self._cgroup_dirs():
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    busy.append(d)  # a process still exiting
            if not busy or time.monotonic() > deadline:
                return
            time.sleep(0.05)


def _cgroup_hierarchies() -> list[Path]:
    seen, found = set(), []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in ("cgroup", "cgroup2"):
                path = Path(fields[4])
                if path not in seen:
                    seen.add(path)
                    found.append(path)
    return found


def _mounts_under(base: Path) -> list[str]:
    prefix = str(base).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    return [p for p in points if p == str(base) or p.startswith(prefix)]


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _netns_names() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except OSError:
        return set()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
