"""The daemon's records of pods and containers, and their durable store.

Records are dataclasses persisted as one JSON file each, written atomically, so a daemon
killed with SIGKILL finds every pod and container again when it starts. A container record is
split as containerd's is: frozen metadata (fixed at create) and a frozen status that only
`RecordStore.replace_status` swaps (ContainerManager.update_status, under the container's lock). The CRI configs of the
original requests are kept verbatim (serialized protobuf) because List/Status must return the
labels and annotations kubelet gave, unchanged.
"""
from __future__ import annotations

import base64
import dataclasses
import enum
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pyshim.checkpoint_restore.records import CheckpointFacts, RestoredFacts, RestoreOrigin
from pyshim.internal.atomic import write_json_atomic

log = logging.getLogger(__name__)


class SandboxState(str, enum.Enum):
    READY = "READY"
    NOTREADY = "NOTREADY"


class ContainerState(str, enum.Enum):
    CREATED = "CREATED"
    RUNNING = "RUNNING"
    EXITED = "EXITED"
    UNKNOWN = "UNKNOWN"


@dataclass
class SandboxRecord:
    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    config_b64: str
    created_at: int
    state: SandboxState = SandboxState.READY
    runtime_handler: str = ""
    netns_name: str = ""  # empty: host network
    ip: str = ""
    additional_ips: list[str] = field(default_factory=list)
    network: dict = field(default_factory=dict)  # the CNI attachment, as persisted by cni.NetworkAttachment
    pin_dir: str = ""
    pid_infra: bool = False
    cgroup_parent: str = ""
    hostname: str = ""
    files_dir: str = ""  # resolv.conf, hosts, hostname of the pod

    kind = "sandbox"


# The on-disk form of a container record: {"metadata": {..., "version": 2}, "status": {...}}. Version 1
# was one flat object (no "metadata" key); ContainerRecord.from_doc still reads it, so that a node
# upgraded across the split keeps its containers.
CONTAINER_RECORD_VERSION = 2


@dataclass(frozen=True)
class ContainerMetadata:
    """What CreateContainer fixed and nothing changes afterwards (containerd's container Metadata)."""
    id: str
    sandbox_id: str
    name: str  # the full reservation key (container_manager.container_name_key)
    attempt: int
    config_b64: str
    image_ref: str  # the image as the request named it
    image_id: str  # "sha256:<config digest>"; a restore's: its checkpoint image id or archive path
    image_name: str  # a repo tag or digest reference of that image
    created_at: int
    dir: str  # persistent per-container dir: bundle (config.json), upper, work, rootfs mountpoint
    log_path: str  # absolute, "" when the request gave none
    cgroups_path: str = ""
    stop_signal: str = "TERM"
    restore: RestoreOrigin | None = None  # created to restore this checkpoint at StartContainer
    version: int = CONTAINER_RECORD_VERSION


@dataclass(frozen=True)
class ContainerStatus:
    """What a container's life changes (containerd's container Status); replaced as a whole, only by
    ContainerManager.update_status under the container's lock."""
    state: ContainerState = ContainerState.CREATED
    pid: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    # False while an exit is recorded but its STOPPED event not yet published: an exit noticed at
    # start-up (the container ended while the daemon was down) is published once the server serves.
    # True by default: nothing is pending for a running container, nor for a record older than this field.
    stopped_event_sent: bool = True
    last_checkpoint: CheckpointFacts | None = None
    restored: RestoredFacts | None = None  # set when the restore of metadata.restore ran


@dataclass(frozen=True, eq=False)
class ContainerRecord:
    """One container: its metadata and its current status, both frozen. The store keeps one record
    object per container and everyone holds that object, so a status replaced by
    `RecordStore.replace_status` is what every holder reads next; nothing else can write to it.

    Every field of the metadata and of the status can be read on the record itself (record.id,
    record.state): read-only conveniences added below the class."""
    metadata: ContainerMetadata
    status: ContainerStatus = ContainerStatus()

    kind = "container"

    @property
    def pending_restore(self) -> bool:
        return self.metadata.restore is not None and self.status.restored is None

    @property
    def restore_from(self) -> str:
        """The checkpoint this container restores from, "" for a cold start."""
        return self.metadata.restore.source if self.metadata.restore else ""

    @property
    def base_image_id(self) -> str:
        """The image the restored rootfs is built on ("" unless restored: image_id is the checkpoint's)."""
        return self.status.restored.base_image_id if self.status.restored else ""

    @property
    def bundle(self) -> Path:
        return Path(self.metadata.dir)

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    @property
    def upper(self) -> Path:
        return self.bundle / "upper"

    @property
    def work(self) -> Path:
        return self.bundle / "work"

    def to_doc(self) -> dict:
        return {"metadata": _metadata_doc(self.metadata), "status": _status_doc(self.status)}

    @classmethod
    def from_doc(cls, doc: dict) -> ContainerRecord:
        if "metadata" not in doc:
            return _from_flat_doc(doc)
        version = doc["metadata"].get("version")
        if version != CONTAINER_RECORD_VERSION:
            raise ValueError(f"container record version {version!r}: this daemon reads versions 1 and "
                             f"{CONTAINER_RECORD_VERSION}")
        meta, status = dict(doc["metadata"]), dict(doc["status"])
        restore = meta.pop("restore", None)
        meta.pop("version", None)
        checkpoint, restored = status.pop("last_checkpoint", None), status.pop("restored", None)
        return cls(
            ContainerMetadata(**meta, restore=RestoreOrigin.from_doc(restore) if restore else None),
            ContainerStatus(**{**status, "state": ContainerState(status.get("state", "CREATED"))},
                            last_checkpoint=CheckpointFacts.from_doc(checkpoint) if checkpoint else None,
                            restored=RestoredFacts.from_doc(restored) if restored else None))


def _read_only(part: str, name: str) -> property:
    return property(lambda record: getattr(getattr(record, part), name),
                    doc=f"record.{part}.{name} (read-only: a status changes through update_status)")


for _part, _type in (("metadata", ContainerMetadata), ("status", ContainerStatus)):
    for _field in dataclasses.fields(_type):
        if not hasattr(ContainerRecord, _field.name):
            setattr(ContainerRecord, _field.name, _read_only(_part, _field.name))


def _metadata_doc(metadata: ContainerMetadata) -> dict:
    doc = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}
    doc["restore"] = metadata.restore.to_doc() if metadata.restore else None
    return doc


def _status_doc(status: ContainerStatus) -> dict:
    doc = {f.name: getattr(status, f.name) for f in dataclasses.fields(status)}
    doc["state"] = status.state.value
    doc["last_checkpoint"] = status.last_checkpoint.to_doc() if status.last_checkpoint else None
    doc["restored"] = status.restored.to_doc() if status.restored else None
    return doc


_FLAT_METADATA = {f.name for f in dataclasses.fields(ContainerMetadata)} - {"restore", "version"}
_FLAT_STATUS = {"pid", "started_at", "finished_at", "exit_code", "reason", "message", "stopped_event_sent"}


def _from_flat_doc(doc: dict) -> ContainerRecord:
    """A version 1 record: one flat object, checkpoint and restore facts as loose keys and dicts."""
    restore = (RestoreOrigin(str(doc["restore_from"]), int(doc.get("restored_checkpoint_time") or 0))
               if doc.get("restore_from") else None)
    metadata = ContainerMetadata(**{k: v for k, v in doc.items() if k in _FLAT_METADATA}, restore=restore)
    figures = doc.get("last_checkpoint") or {}
    checkpoint = CheckpointFacts(
        location=str(doc.get("checkpoint_location", "")), time_ns=int(doc["checkpointed_at"]),
        frozen_ms=float(figures.get("frozenMs", 0.0)), total_ms=float(figures.get("totalMs", 0.0)),
        archive_bytes=int(figures.get("archiveBytes", 0)), tcp_established=bool(figures.get("tcpEstablished")),
        stopped=bool(figures.get("stopped")), phases_ms=figures.get("phasesMs") or {},
    ) if doc.get("checkpointed_at") else None
    restored = RestoredFacts(base_image_id=str(doc.get("base_image_id", "")), tcp=str(doc.get("restore_tcp", "")),
                             phases_ms=doc.get("restore_phases_ms") or {}) if doc.get("restored") else None
    status = ContainerStatus(state=ContainerState(doc.get("state", "CREATED")),
                             **{k: v for k, v in doc.items() if k in _FLAT_STATUS},
                             last_checkpoint=checkpoint, restored=restored)
    return ContainerRecord(metadata, status)


def encode_config(message) -> str:
    return base64.b64encode(message.SerializeToString()).decode()


def decode_config(record, message_type):
    message = message_type()
    message.ParseFromString(base64.b64decode(record.config_b64))
    return message


_ENUM_FIELDS = {"state"}


def _to_doc(record) -> dict:
    if isinstance(record, ContainerRecord):
        return record.to_doc()
    return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(record).items()}


def _from_doc(cls, doc: dict):
    if cls is ContainerRecord:
        return ContainerRecord.from_doc(doc)
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: v for k, v in doc.items() if k in names}
    if "state" in values:
        enum_type = SandboxState if cls is SandboxRecord else ContainerState
        values["state"] = enum_type(values["state"])
    return cls(**values)


class RecordStore:
    """One JSON file per record under `directory`; an in-memory index guarded by a lock."""

    def __init__(self, directory: Path, record_type):
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._type = record_type
        self._records: dict[str, object] = {}
        self._lock = threading.RLock()

    def load(self) -> None:
        with self._lock:
            for path in sorted(self._dir.glob("*.json")):
                try:
                    record = _from_doc(self._type, json.loads(path.read_text()))
                except (ValueError, TypeError, KeyError) as e:
                    # A record we cannot read must not stop the daemon; keep the file for a human.
                    log.error("unreadable state record, skipped", extra={"path": str(path), "error": str(e)})
                    continue
                self._records[record.id] = record

    def save(self, record) -> None:
        with self._lock:
            write_json_atomic(self._dir / f"{record.id}.json", _to_doc(record))
            self._records[record.id] = record

    def replace_status(self, record: ContainerRecord, status: ContainerStatus) -> None:
        """Give a stored container record its new status: saved first, so that the record in memory
        never says what the disk does not (a failed save leaves both as they were). The one write a
        frozen record allows; ContainerManager.update_status calls it under the container's lock."""
        with self._lock:
            write_json_atomic(self._dir / f"{record.id}.json", dataclasses.replace(record, status=status).to_doc())
            object.__setattr__(record, "status", status)

    def delete(self, record_id: str) -> None:
        with self._lock:
            self._records.pop(record_id, None)
            try:
                os.unlink(self._dir / f"{record_id}.json")
            except FileNotFoundError:
                pass

    def get(self, record_id: str):
        with self._lock:
            return self._records.get(record_id)

    def all(self) -> list:
        with self._lock:
            return list(self._records.values())

    def resolve(self, id_or_prefix: str):
        """Exact id, or a unique prefix (crictl users type short ids)."""
        with self._lock:
            if not id_or_prefix:
                return None
            if id_or_prefix in self._records:
                return self._records[id_or_prefix]
            matches = [r for rid, r in self._records.items() if rid.startswith(id_or_prefix)]
            return matches[0] if len(matches) == 1 else None
