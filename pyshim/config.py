"""Daemon configuration: built-in defaults, then a TOML file, then command-line flags.

The defaults alone give a working node (socket /run/pyshim/pyshim.sock, root /var/lib/pyshim,
state /run/pyshim, runc + conmon from PATH). Every path is configurable so that several daemons
can run side by side on one machine (tests, benchmarks, two-node setups).
"""
from __future__ import annotations

import dataclasses
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pyshim.errors import InvalidArgument


@dataclass
class NetworkConfig:
    name: str = "pyshim"
    bridge: str = "pyshim0"
    # A private range away from Podman's 10.88/16 and Docker's 172.17/16 so they can coexist.
    subnet: str = "10.85.0.0/16"
    plugin_dirs: list[str] = field(default_factory=lambda: ["/usr/lib/cni", "/opt/cni/bin"])
    # A user-provided CNI conflist replaces the embedded default network when set.
    conflist: str = ""
    # Prefix of the names under /run/netns, so that two daemons never collide.
    netns_prefix: str = "pyshim-"


@dataclass
class ImageConfig:
    insecure_registries: list[str] = field(default_factory=list)
    pull_timeout: float = 300.0
    # Registry host -> mirror hosts tried first, in order (an air-gapped node's local registry).
    # TOML: [images.mirrors] "registry.k8s.io" = ["10.0.0.5:5000"]
    mirrors: dict[str, list[str]] = field(default_factory=dict)

    def check(self) -> None:
        """Mirrors are host[:port] names: a URL or a path would be sent requests it never meant."""
        if not isinstance(self.mirrors, dict):
            raise InvalidArgument("configuration key images.mirrors must be a table of registry = [mirrors]")
        for registry, hosts in self.mirrors.items():
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise InvalidArgument(f"images.mirrors.{registry!r} must be a list of host[:port] strings")
            for host in [registry, *hosts]:
                if not host or any(c in host for c in "/@ ") or "://" in host:
                    raise InvalidArgument(f"images.mirrors: {host!r} is not a registry host[:port] "
                                          "(no scheme, path or user)")


@dataclass
class CheckpointSettings:
    # Either can be switched off, as in CRI-O (e.g. on nodes that must never hold memory dumps).
    enable_checkpoint: bool = True
    enable_restore: bool = True
    # Plain tar is what kubelet users expect; "gzip" and "zstd" shrink archives.
    compression: str = "none"
    # "auto": --tcp-established only when the container has established connections (CRIU refuses to
    # dump them otherwise); "always" / "never" force it.
    tcp_established: str = "auto"
    # CRIU older than 4.2 cannot dump on kernels >= 6.16 (vDSO, TCP socket options).
    min_criu_version: str = "4.2"
    # Post-copy restores by default (annotation io.pyshim.restore.lazy overrides it per container):
    # the process runs before its memory arrives, served by CRIU's lazy-pages daemon.
    lazy_restore: bool = False
    # CRIU's kernel-feature cache /run/criu.kdat, written at every daemon start where CRIU would not
    # keep it itself: "auto" = only when /run is not a tmpfs; "always"; "never" (criu_glue/kdat_cache.py).
    criu_kdat_cache: str = "auto"


@dataclass
class StreamingConfig:
    """The server behind the URLs of Exec, Attach and PortForward. Its URLs give a shell in containers,
    so it listens on the loopback by default; port 0 picks a free port at each start (as CRI-O's
    default). Kubelet (or crictl) connects to it on the node."""
    address: str = "127.0.0.1"
    port: int = 0
    # How long a URL stays valid before its client connects (the CRI default is one minute).
    token_ttl: float = 60.0


@dataclass
class Config:
    socket: str = "/run/pyshim/pyshim.sock"
    root: str = "/var/lib/pyshim"
    state_dir: str = "/run/pyshim"
    log_level: str = "info"
    runtime_path: str = "runc"
    conmon_path: str = "conmon"
    # cgroupfs parent of every pod that does not name its own (there is no systemd here).
    cgroup_parent: str = "/pyshim"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    def resolved_binary(self, name: str) -> str:
        """Absolute path of runc/conmon: conmon and CRIU need absolute paths, not PATH lookups."""
        configured = getattr(self, f"{name}_path")
        found = shutil.which(configured)
        if not found:
            raise InvalidArgument(f"{name} binary {configured!r} not found in PATH; install it or set {name}_path")
        return found


_SECTIONS = {"network": NetworkConfig, "images": ImageConfig, "checkpoint": CheckpointSettings,
             "streaming": StreamingConfig}


def _apply(target, values: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in known:
            raise InvalidArgument(f"unknown configuration key {where}{key!r}")
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise InvalidArgument(f"configuration key {where}{key!r} must be a table")
            _apply(getattr(target, key), value, f"{where}{key}.")
        else:
            setattr(target, key, value)


def load_config(path: str | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then the TOML file at `path` (if given), then non-None `overrides`."""
    config = Config()
    if path:
        try:
            with open(path, "rb") as f:
                _apply(config, tomllib.load(f), "")
        except FileNotFoundError:
            raise InvalidArgument(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument(f"configuration file {path} is not valid TOML: {e}") from None
    _apply(config, {k: v for k, v in (overrides or {}).items() if v is not None}, "")
    config.images.check()
    return config


def default_config_toml() -> str:
    """The built-in defaults as a TOML document (what `pyshim config` prints)."""
    def fmt(v):
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{fmt(k)} = {fmt(x)}" for k, x in v.items()) + "}"
        return str(v)

    config = Config()
    top, tables = [], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in _SECTIONS:
            body = "\n".join(f"{sf.name} = {fmt(getattr(value, sf.name))}" for sf in dataclasses.fields(value))
            tables.append(f"[{f.name}]\n{body}\n")
        else:
            top.append(f"{f.name} = {fmt(value)}")
    return "\n".join(top) + "\n\n" + "\n".join(tables)
