"""What a container's record keeps of checkpoints and restores: typed, immutable sub-records.

A ContainerRecord (pyshim/internal/state.py) holds three of these:
- `RestoreOrigin` in its metadata: the checkpoint CreateContainer was asked to restore from (it never
  changes: the container *is* that restore);
- `RestoredFacts` in its status: what StartContainer's restore did (set once, when it runs);
- `CheckpointFacts` in its status: the last checkpoint taken of it (replaced by each checkpoint).

Each has its reader and writer here (`from_doc`/`to_doc`, the on-disk form inside the record's JSON)
and `info()`, its form in ContainerStatus's verbose info, whose keys tools (pyshim migrate, tests,
people) read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from criu_glue.archive import ArchiveDigest


def _frozen_map(values: Mapping | None = None) -> Mapping[str, float]:
    """A read-only copy: a frozen record must not be changed through a dict it holds."""
    return MappingProxyType(dict(values or {}))


@dataclass(frozen=True)
class CheckpointFacts:
    """The last checkpoint of a container (CheckpointContainer or its part of CheckpointPod)."""
    location: str            # the archive written (or the pod checkpoint's directory)
    time_ns: int             # when it finished
    frozen_ms: float = 0.0   # how long the container's processes were frozen
    total_ms: float = 0.0
    archive_bytes: int = 0
    tcp_established: bool = False  # the archive holds established TCP connections
    stopped: bool = False    # a stop-mode checkpoint: the container was stopped after its dump
    phases_ms: Mapping[str, float] = field(default_factory=_frozen_map)
    archive: ArchiveDigest | None = None  # the archive's digest and size, computed as it was written

    def __post_init__(self):
        object.__setattr__(self, "phases_ms", _frozen_map(self.phases_ms))

    def to_doc(self) -> dict:
        doc = {"location": self.location, "timeNs": self.time_ns, "frozenMs": self.frozen_ms,
               "totalMs": self.total_ms, "archiveBytes": self.archive_bytes,
               "tcpEstablished": self.tcp_established, "stopped": self.stopped, "phasesMs": dict(self.phases_ms)}
        if self.archive is not None:
            doc["archive"] = self.archive.to_json()
        return doc

    @classmethod
    def from_doc(cls, doc: dict) -> CheckpointFacts:
        return cls(location=str(doc["location"]), time_ns=int(doc["timeNs"]),
                   frozen_ms=float(doc.get("frozenMs", 0.0)), total_ms=float(doc.get("totalMs", 0.0)),
                   archive_bytes=int(doc.get("archiveBytes", 0)), tcp_established=bool(doc.get("tcpEstablished")),
                   stopped=bool(doc.get("stopped")), phases_ms=doc.get("phasesMs") or {},
                   archive=ArchiveDigest.from_json(doc.get("archive")))

    def figures(self) -> dict:
        """The verbose info's `lastCheckpoint` (the keys `pyshim migrate` reports)."""
        figures = {"frozenMs": self.frozen_ms, "totalMs": self.total_ms, "archiveBytes": self.archive_bytes,
                   "tcpEstablished": self.tcp_established, "stopped": self.stopped, "phasesMs": dict(self.phases_ms)}
        if self.archive is not None:
            figures["archive"] = self.archive.to_json()
        return figures


@dataclass(frozen=True)
class RestoreOrigin:
    """The checkpoint a container was created to restore from (CreateContainer's restore source)."""
    source: str                  # the archive, or the checkpoint image's layer blob
    checkpoint_time_ns: int = 0  # when that checkpoint was taken (0: the archive does not say)

    def to_doc(self) -> dict:
        return {"source": self.source, "checkpointTimeNs": self.checkpoint_time_ns}

    @classmethod
    def from_doc(cls, doc: dict) -> RestoreOrigin:
        return cls(source=str(doc["source"]), checkpoint_time_ns=int(doc.get("checkpointTimeNs", 0)))


@dataclass(frozen=True)
class RestoredFacts:
    """What the restore did, once StartContainer (or recovery's adoption) brought the process back."""
    base_image_id: str  # the image the restored rootfs is built on (the record's image_id is the checkpoint's)
    tcp: str = ""       # restore.TcpMode value: established, close or none ("" if unknown, e.g. adopted)
    phases_ms: Mapping[str, float] = field(default_factory=_frozen_map)

    def __post_init__(self):
        object.__setattr__(self, "phases_ms", _frozen_map(self.phases_ms))

    def to_doc(self) -> dict:
        return {"baseImageId": self.base_image_id, "tcp": self.tcp, "phasesMs": dict(self.phases_ms)}

    @classmethod
    def from_doc(cls, doc: dict) -> RestoredFacts:
        return cls(base_image_id=str(doc.get("baseImageId", "")), tcp=str(doc.get("tcp", "")),
                   phases_ms=doc.get("phasesMs") or {})
