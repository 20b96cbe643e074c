"""The daemon's records of pods and containers, and their durable store.

Records are plain dataclasses persisted as one JSON file each, written atomically, so a daemon
killed with SIGKILL finds every pod and container again when it starts. The CRI configs of the
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


@dataclass
class ContainerRecord:
    id: str
    sandbox_id: str
    name: str
    attempt: int
    config_b64: str
    image_ref: str  # the image as the request named it
    image_id: str  # "sha256:<config digest>"
    image_name: str  # a repo tag or digest reference of that image
    created_at: int
    dir: str  # persistent per-container dir: bundle (config.json), upper, work, rootfs mountpoint
    log_path: str  # absolute, "" when the request gave none
    cgroups_path: str = ""
    stop_signal: str = "TERM"
    state: ContainerState = ContainerState.CREATED
    pid: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    checkpointed_at: int = 0  # ns; 0 = never checkpointed
    checkpoint_location: str = ""
    # The last checkpoint's figures (frozenMs, archiveBytes, stopped, phasesMs) for ContainerStatus.
    last_checkpoint: dict = field(default_factory=dict)
    # Restores: the archive (or checkpoint image layer) to restore from at StartContainer; "" = a cold start.
    restore_from: str = ""
    base_image_id: str = ""  # the image the restored rootfs is built on (image_id is the checkpoint's)
    restored: bool = False
    restore_tcp: str = ""  # restorer.TcpMode value chosen at restore
    restored_checkpoint_time: int = 0  # ns; when the checkpoint restored from was taken
    restore_phases_ms: dict = field(default_factory=dict)
    # False while an exit is recorded but its STOPPED event not yet published: an exit noticed at
    # start-up (the container ended while the daemon was down) is published once the server serves.
    # True by default: nothing is pending for a running container, nor for a record older than this field.
    stopped_event_sent: bool = True

    kind = "container"

    @property
    def pending_restore(self) -> bool:
        return bool(self.restore_from) and not self.restored

    @property
    def bundle(self) -> Path:
        return Path(self.dir)

    @property
    def rootfs(self) -> Path:
        return Path(self.dir) / "rootfs"

    @property
    def upper(self) -> Path:
        return Path(self.dir) / "upper"

    @property
    def work(self) -> Path:
        return Path(self.dir) / "work"


def encode_config(message) -> str:
    return base64.b64encode(message.SerializeToString()).decode()


def decode_config(record, message_type):
    message = message_type()
    message.ParseFromString(base64.b64decode(record.config_b64))
    return message


_ENUM_FIELDS = {"state"}


def _to_doc(record) -> dict:
    return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(record).items()}


def _from_doc(cls, doc: dict):
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
