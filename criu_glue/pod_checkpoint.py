"""The pod checkpoint format (CheckpointPod / RestorePod): reader and writer, version 1.

A pod checkpoint is a directory (the CRI caller's `output_path`) holding:

    pod-checkpoint.json        the manifest, written last: its presence marks a complete checkpoint
    containers/<index>.tar     one container checkpoint per selected container, each in the
                               ordinary container archive format (criu_glue.archive_format), so
                               `pyshim inspect-checkpoint` and checkpointctl read every part

The manifest (JSON, at most MAX_MANIFEST_BYTES):

    {"format": "pyshim-pod-checkpoint", "version": 1, "engine": "pyshim",
     "checkpointed_time_ns": ..., "checkpointed_at": "<RFC 3339>",
     "pod": {"id": "<sandbox id>", "config": {<PodSandboxConfig, protobuf JSON>}},
     "pod_ips": ["10.88.0.5"], "tcp": "auto|established|close",
     "containers": [{"index": 0, "name": "<metadata name>", "id": "<container id>",
                     "config": {<ContainerConfig, protobuf JSON>},
                     "tcp_connections": [{"local": "127.0.0.1", "local_port": 80,
                                          "peer": "127.0.0.1", "peer_port": 41234}]}]}

Parts are archives, not unpacked directories, and uncompressed by default: a restore reads each
part through the same hardened archive reader as a container restore (every hostile-archive check
applies unchanged), an uncompressed tar is indexed and extracted at disk speed with no
decompression, and a part file can be handed to checkpointctl or restored on its own. An unpacked
directory would save one copy at restore, but would need a second, directory-based validation of
untrusted trees (symlinks, special files, sizes) that the archive reader already does.

Read as untrusted input: part file names are derived from the index, never taken from the
manifest; names must be unique and non-empty; part files must be regular files (no symlink) in
`containers/`. Nothing security-relevant comes from the configs in the manifest: they are kept to
check the restore request against (image, command, args, working dir, env) and for inspection.
"""
from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from criu_glue.archive_format import format_rfc3339_ns
from criu_glue.errors import ArchiveFormatError

FORMAT_NAME = "pyshim-pod-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "pod-checkpoint.json"
PARTS_DIR = "containers"
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONTAINERS = 256
TCP_POLICIES = ("auto", "established", "close")


def part_name(index: int) -> str:
    """The part's path relative to the checkpoint directory; derived, never read from a manifest."""
    return f"{PARTS_DIR}/{index}.tar"


@dataclass(frozen=True)
class TcpConnection:
    local: str
    local_port: int
    peer: str
    peer_port: int

    @property
    def loopback(self) -> bool:
        return _is_loopback(self.local) and _is_loopback(self.peer)

    def to_doc(self) -> dict:
        return {"local": self.local, "local_port": self.local_port, "peer": self.peer, "peer_port": self.peer_port}


@dataclass(frozen=True)
class PodContainer:
    index: int
    name: str
    id: str
    config: dict[str, Any]  # ContainerConfig as protobuf JSON
    tcp_connections: tuple[TcpConnection, ...] = ()

    @property
    def part(self) -> str:
        return part_name(self.index)

    @property
    def loopback_tcp_only(self) -> bool:
        """Every established connection it holds is on the pod's loopback (both ends in the pod)."""
        return all(c.loopback for c in self.tcp_connections)


@dataclass(frozen=True)
class PodManifest:
    pod_id: str
    pod_config: dict[str, Any]  # PodSandboxConfig as protobuf JSON
    pod_ips: tuple[str, ...]
    containers: tuple[PodContainer, ...]
    tcp: str = "auto"
    checkpointed_time_ns: int = field(default_factory=time.time_ns)
    engine: str = "pyshim"
    version: int = FORMAT_VERSION

    def container(self, name: str) -> PodContainer | None:
        return next((c for c in self.containers if c.name == name), None)

    def to_doc(self) -> dict:
        return {
            "format": FORMAT_NAME, "version": self.version, "engine": self.engine,
            "checkpointed_time_ns": self.checkpointed_time_ns,
            "checkpointed_at": format_rfc3339_ns(self.checkpointed_time_ns),
            "pod": {"id": self.pod_id, "config": self.pod_config},
            "pod_ips": list(self.pod_ips), "tcp": self.tcp,
            "containers": [{"index": c.index, "name": c.name, "id": c.id, "config": c.config,
                            "tcp_connections": [t.to_doc() for t in c.tcp_connections]}
                           for c in self.containers],
        }


def write_manifest(directory: Path, manifest: PodManifest) -> Path:
    """The manifest, durably and last: a reader never sees a manifest whose parts are incomplete."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    data = json.dumps(manifest.to_doc(), indent=1, sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def is_pod_checkpoint(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def read_manifest(directory: Path) -> PodManifest:
    """The manifest of the pod checkpoint in `directory`, checked as untrusted input."""
    directory = Path(directory)
    where = str(directory)
    path = directory / MANIFEST
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ArchiveFormatError(where, f"no {MANIFEST}: not a pod checkpoint (or an incomplete one)") from None
    except OSError as e:
        raise ArchiveFormatError(where, f"cannot open {MANIFEST}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ArchiveFormatError(where, f"{MANIFEST} is not a regular file")
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ArchiveFormatError(where, f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ArchiveFormatError(where, f"{MANIFEST} is not JSON: {e}") from None
    manifest = _manifest_from(doc, where)
    for c in manifest.containers:
        _check_part(directory, c, where)
    return manifest


def _manifest_from(doc: Any, where: str) -> PodManifest:
    def bad(detail: str) -> ArchiveFormatError:
        return ArchiveFormatError(where, f"{MANIFEST}: {detail}")

    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise bad(f"not a {FORMAT_NAME} manifest")
    if doc.get("version") != FORMAT_VERSION:
        raise bad(f"format version {doc.get('version')!r} is not supported (this pyshim reads {FORMAT_VERSION})")
    pod = doc.get("pod")
    if not isinstance(pod, dict) or not isinstance(pod.get("config"), dict) or not isinstance(pod.get("id"), str):
        raise bad("pod must be an object with a string id and a config object")
    ips = doc.get("pod_ips", [])
    if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
        raise bad("pod_ips must be a list of strings")
    tcp = doc.get("tcp", "auto")
    if tcp not in TCP_POLICIES:
        raise bad(f"tcp {tcp!r} is not one of {TCP_POLICIES}")
    when = doc.get("checkpointed_time_ns")
    if not isinstance(when, int) or isinstance(when, bool) or when < 0:
        raise bad("checkpointed_time_ns must be a non-negative integer")
    entries = doc.get("containers")
    if not isinstance(entries, list) or not entries:
        raise bad("containers must be a non-empty list")
    if len(entries) > MAX_CONTAINERS:
        raise bad(f"more than {MAX_CONTAINERS} containers")
    containers = tuple(_container_from(i, e, bad) for i, e in enumerate(entries))
    names = [c.name for c in containers]
    if len(set(names)) != len(names):
        raise bad(f"container names are not unique: {sorted(names)}")
    return PodManifest(pod_id=pod["id"], pod_config=pod["config"], pod_ips=tuple(ips), containers=containers,
                       tcp=tcp, checkpointed_time_ns=when, engine=str(doc.get("engine", "")), version=FORMAT_VERSION)


def _container_from(position: int, entry: Any, bad) -> PodContainer:
    if not isinstance(entry, dict):
        raise bad(f"containers[{position}] is not an object")
    if entry.get("index") != position:
        raise bad(f"containers[{position}].index must be {position}")
    name, cid, config = entry.get("name"), entry.get("id"), entry.get("config")
    if not isinstance(name, str) or not name or len(name) > 253:
        raise bad(f"containers[{position}].name must be a non-empty string")
    if not isinstance(cid, str) or not isinstance(config, dict):
        raise bad(f"containers[{position}] needs a string id and a config object")
    conns = entry.get("tcp_connections", [])
    if not isinstance(conns, list):
        raise bad(f"containers[{position}].tcp_connections must be a list")
    parsed = []
    for c in conns:
        try:
            parsed.append(TcpConnection(str(c["local"]), int(c["local_port"]), str(c["peer"]), int(c["peer_port"])))
        except (TypeError, KeyError, ValueError):
            raise bad(f"containers[{position}].tcp_connections holds a malformed entry") from None
    return PodContainer(index=position, name=name, id=cid, config=config, tcp_connections=tuple(parsed))


def _check_part(directory: Path, container: PodContainer, where: str) -> None:
    part = directory / container.part
    try:
        st = os.lstat(part)
        parts_dir = os.lstat(directory / PARTS_DIR)
    except FileNotFoundError:
        raise ArchiveFormatError(where, f"part {container.part} of container {container.name!r} is missing") from None
    if not stat.S_ISDIR(parts_dir.st_mode):
        raise ArchiveFormatError(where, f"{PARTS_DIR} is not a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveFormatError(where, f"part {container.part} of container {container.name!r} is not a regular file")


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "::ffff:127.0.0.1") or address.startswith("::ffff:127.")
