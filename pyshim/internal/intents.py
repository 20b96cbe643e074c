"""The intent journal: what the daemon is about to change outside its records, written down first.

A kill -9 of the daemon can come between any two steps of an operation. Everything an operation
makes outside pyshim's records (a network namespace, an IP, a mount, a runc container, a conmon, a
frozen cgroup, a CRIU work directory, a temporary archive) is announced here, durably, before it is
made, and the intent is closed only when the operation finished or was undone. At start-up,
recovery (pyshim/internal/recovery.py) reads the intents still open and repairs each one.

The format is versioned; one JSON file per open intent under `<root>/state/intents/`:

    {"version": 1, "id": "...", "operation": "checkpoint_container", "target": "<container id>",
     "step": "frozen", "started_at_ns": ..., "facts": {"work_dir": "...", "archive_tmp": "..."}}

`facts` holds only strings: what recovery needs to find what the operation made (paths, names).
Each `advance` is also a crash point (pyshim/internal/crashpoints.py), named `<operation>:<step>`,
so that the fault-injection tests can kill the daemon at every step deterministically.
"""
from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyshim.internal import crashpoints
from pyshim.internal.atomic import write_json_atomic

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1


class Operation(str, enum.Enum):
    RUN_SANDBOX = "run_sandbox"
    STOP_SANDBOX = "stop_sandbox"
    REMOVE_SANDBOX = "remove_sandbox"
    CREATE_CONTAINER = "create_container"
    START_CONTAINER = "start_container"
    RESTORE_CONTAINER = "restore_container"
    STOP_CONTAINER = "stop_container"
    REMOVE_CONTAINER = "remove_container"
    CHECKPOINT_CONTAINER = "checkpoint_container"
    LAZY_CHECKPOINT = "lazy_checkpoint"  # pyshim/checkpoint_restore/lazy_checkpoint.py recovers it
    CHECKPOINT_POD = "checkpoint_pod"  # pyshim/checkpoint_restore/pod_checkpoint.py recovers it
    RESTORE_POD = "restore_pod"  # pyshim/checkpoint_restore/pod_restore_journal.py recovers it
    PULL_IMAGE = "pull_image"
    RECEIVE_CHECKPOINT_IMAGE = "receive_checkpoint_image"  # another process's (pyshim/internal/image_receives.py)


@dataclass
class Intent:
    id: str
    operation: Operation
    target: str  # the sandbox or container id, or the image reference
    step: str  # the last step announced
    started_at_ns: int
    facts: dict[str, str] = field(default_factory=dict)
    version: int = JOURNAL_VERSION

    def to_doc(self) -> dict:
        return {"version": self.version, "id": self.id, "operation": self.operation.value,
                "target": self.target, "step": self.step, "started_at_ns": self.started_at_ns,
                "facts": dict(self.facts)}

    @classmethod
    def from_doc(cls, doc: dict) -> "Intent":
        if not isinstance(doc, dict) or doc.get("version") != JOURNAL_VERSION:
            raise ValueError(f"unsupported intent version {doc.get('version') if isinstance(doc, dict) else doc!r}")
        facts = doc.get("facts") or {}
        if not isinstance(facts, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in facts.items()):
            raise ValueError("intent facts must map strings to strings")
        return cls(id=str(doc["id"]), operation=Operation(doc["operation"]), target=str(doc["target"]),
                   step=str(doc["step"]), started_at_ns=int(doc["started_at_ns"]), facts=facts)


class IntentJournal:
    """Open intents, one durable file each. Thread-safe; every write is fsynced before it returns."""

    def __init__(self, directory: Path):
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()

    def begin(self, operation: Operation, target: str, step: str = "begin", **facts: str) -> Intent:
        intent = Intent(id=f"{time.time_ns():020d}-{secrets.token_hex(4)}", operation=operation, target=target,
                        step=step, started_at_ns=time.time_ns(), facts={k: str(v) for k, v in facts.items()})
        self._write(intent)
        crashpoints.reached(f"{operation.value}:{step}")
        return intent

    def advance(self, intent: Intent, step: str, **facts: str) -> None:
        """Announce the next step (and what it will make) before doing it."""
        intent.step = step
        intent.facts.update({k: str(v) for k, v in facts.items()})
        self._write(intent)
        crashpoints.reached(f"{intent.operation.value}:{step}")

    def finish(self, intent: Intent) -> None:
        """The operation is complete, or fully undone: nothing of it is left for recovery."""
        with self._lock:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(intent.id))

    @contextlib.contextmanager
    def track(self, operation: Operation, target: str, **facts: str):
        """An intent open for the duration of a block. It is closed when the block ends, by returning
        or by raising: a raised error has already run the operation's undo steps. Only a killed
        daemon leaves it open."""
        intent = self.begin(operation, target, **facts)
        try:
            yield intent
        finally:
            self.finish(intent)

    def pending(self) -> list[Intent]:
        """Open intents, oldest first. An unreadable file is logged and left for a human."""
        found = []
        for path in sorted(self._dir.glob("*.json")):
            try:
                found.append(Intent.from_doc(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("unreadable intent, skipped", extra={"path": str(path), "error": str(e)})
        return found

    def _path(self, intent_id: str) -> Path:
        return self._dir / f"{intent_id}.json"

    def _write(self, intent: Intent) -> None:
        with self._lock:
            write_json_atomic(self._path(intent.id), intent.to_doc(), mode=0o600)
