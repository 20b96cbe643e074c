"""Where a move stands, on disk, so that a killed `pyshim migrate` rerun finishes or rolls back."""
from __future__ import annotations

import enum
import fcntl
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyshim.internal.atomic import write_json_atomic
from pyshim.migration.workload import MoveError


class Phase(str, enum.Enum):
    STARTED = "started"          # nothing stopped yet
    CHECKPOINTING = "checkpointing"  # CheckpointContainer sent: the source may be stopping
    CHECKPOINTED = "checkpointed"    # the archive is complete; the source container has ended
    PUSHED = "pushed"                # the checkpoint image is in the registry
    RESTORING = "restoring"          # the target pod/container may exist
    RUNNING = "running"              # the container runs on the target; the source is still to clean


_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class JournalFile:
    """Saving a move's journal (a dataclass with `path` and `phase`): one atomic, private JSON file,
    rewritten at every phase, so that a rerun knows what was done."""

    def save(self) -> None:
        doc = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in asdict(self).items()}
        write_json_atomic(Path(self.path), doc, mode=0o600)

    def advance(self, phase, **changes) -> None:
        for key, value in changes.items():
            setattr(self, key, value)
        self.phase = phase
        self.save()

    def discard(self) -> None:
        Path(self.path).unlink(missing_ok=True)


@dataclass
class Journal(JournalFile):
    path: str
    source: str
    target: str
    container_id: str
    phase: Phase = Phase.STARTED
    workload: dict = field(default_factory=dict)
    archive: str = ""
    image_ref: str = ""
    target_pod: str = ""
    target_container: str = ""
    started_at: float = field(default_factory=time.time)


def journal_path(work_dir: Path, container_id: str) -> Path:
    if not _SAFE_ID.fullmatch(container_id):
        raise MoveError(f"invalid container id {container_id!r}")
    return work_dir / f"{container_id}.json"


def open_journal(work_dir: Path, source: str, target: str, container_id: str) -> Journal:
    """The journal of an unfinished move of this container, or a new one."""
    return load_journal(Journal, Phase, journal_path(work_dir, container_id), source, target,
                        container_id, container_id=container_id)


def load_journal(cls, phase_type, path: Path, source: str, target: str, what: str, **fresh):
    """The journal at `path` of an unfinished move of `what` (a container, a pod) between the same two
    nodes, or a new `cls` made with `fresh` when there is none. A journal of a move between other
    nodes, or one that cannot be read, stops the caller: a human decides."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return cls(path=str(path), source=source, target=target, **fresh)
    except (OSError, ValueError) as e:
        raise MoveError(f"cannot read the journal of an earlier move, {path}: {e}; look at it, "
                        "then remove it to start over") from None
    if (doc.get("source"), doc.get("target")) != (source, target):
        raise MoveError(f"an unfinished move of {what} from {doc.get('source')} to {doc.get('target')} "
                        f"is recorded in {path}: rerun that one (or `--rollback` it) first")
    doc["phase"] = phase_type(doc["phase"])
    return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


class JournalLock:
    """One move of a container at a time: a second `pyshim migrate` of it fails instead of racing."""

    def __init__(self, work_dir: Path, container_id: str):
        self._path = journal_path(work_dir, container_id).with_suffix(".lock")
        self._fd = -1

    def __enter__(self) -> "JournalLock":
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise MoveError(f"another `pyshim migrate` is moving this container (lock {self._path})") from None
        return self

    def __exit__(self, *exc) -> None:
        # Unlinked while still held: whoever opens the path next gets a fresh, free lock file.
        self._path.unlink(missing_ok=True)
        os.close(self._fd)
