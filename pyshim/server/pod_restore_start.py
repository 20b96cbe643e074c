"""StartContainer of the containers RestorePod returned: the first one restores them all, together.

RestorePod records the containers it created (their ids, in `<pod pin dir>/pod-restore-group`, which
goes with the pod). Until the first StartContainer of any of them every one is CREATED and has not
run, as the CRI asks of RestorePod. That first StartContainer restores every container of the group
still waiting, side by side (one thread each: rootfs, unpacking, `runc restore`), and then lifts the
lock on the pod's loopback connections (pod_restore.after_restore_started). A StartContainer of a
container of the group that is already restored returns at once; one whose restore failed with the
others reports that failure. So:

- the pod restores in about the time of its largest container, not the sum of all (the kubelet calls
  StartContainer one container after another);
- containers that share state (a connection over the pod's loopback, a file in a volume) resume at
  the same moment, not one StartContainer apart;
- from the first StartContainer on, the pod's other containers run before their own StartContainer
  is called: the kubelet's per-container pre-start work for them (e.g. the CPU manager's
  PreStartContainer) comes after they run. A RestorePod caller that needs one container held until
  its own StartContainer cannot have it with pyshim.

A container restored on its own (CreateContainer naming an archive) is not in any group and keeps
its own StartContainer.

RestorePod also hands each container's part over as it checked it, open and indexed (`hold_part`):
the first StartContainer restores from those (`held_part`), not from the files opened and indexed
again, and the very files that were checked. A part is closed once its container was restored or
removed; after a daemon restart none is held and each part is opened again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyshim.errors import FailedPrecondition
from pyshim.internal.atomic import write_json_atomic
from pyshim.internal.state import ContainerState
from pyshim.server.runtime import Runtime

log = logging.getLogger(__name__)

GROUP_FILE = "pod-restore-group"


class _PodLock:
    """One pod's group-restore lock. Held weakly by `_locks`: the entry lives exactly as long as some
    StartContainer holds or waits for it, so the map never outgrows the StartContainers in flight
    (no pruning at pod removal to forget), and two concurrent callers always share one lock."""
    __slots__ = ("_lock", "__weakref__")

    def __init__(self):
        self._lock = threading.Lock()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


_locks: "weakref.WeakValueDictionary[str, _PodLock]" = weakref.WeakValueDictionary()
_locks_guard = threading.Lock()


# container id -> (its open part, a restore.OpenCheckpoint; the ExitStack that closes it)
_held: dict[str, tuple[object, contextlib.ExitStack]] = {}
_held_guard = threading.Lock()


def hold_part(container_id: str, checkpoint, closing: contextlib.ExitStack) -> None:
    """RestorePod: keep this container's checked, open part for its restore; `closing` closes it."""
    with _held_guard:
        _held[container_id] = (checkpoint, closing)


@contextlib.contextmanager
def held_part(container_id: str):
    """The part RestorePod holds for this container (None if none: opened again), closed afterwards."""
    with _held_guard:
        checkpoint, closing = _held.pop(container_id, (None, None))
    try:
        yield checkpoint
    finally:
        if closing is not None:
            closing.close()


def release_part(container_id: str) -> None:
    """The container is removed (ContainerManager.on_remove): close its part if it was never restored."""
    with held_part(container_id):
        pass


def record_group(sandbox, container_ids: list[str]) -> None:
    """RestorePod: these containers are restored together at the first StartContainer of any of them."""
    write_json_atomic(_group_path(sandbox), {"containers": list(container_ids)}, mode=0o600)


def start_with_pod(rt: Runtime, record, restore_one) -> bool:
    """StartContainer of `record`: if RestorePod made it, restore its group (once) and return True;
    False for any other container. `restore_one(record)` restores one CREATED container."""
    if not record.restore_from:
        return False
    sandbox = rt.sandboxes.find(record.sandbox_id)
    group = _read_group(sandbox) if sandbox is not None else []
    if record.id not in group:
        return False
    from pyshim.server.pod_restore import after_restore_started  # (pod_restore imports this module)

    with _lock_for(sandbox.id):  # two StartContainers of one pod: the second waits for the first's restore
        waiting = [r for r in (rt.containers.find(cid) for cid in group)
                   if r is not None and r.pending_restore and r.state == ContainerState.CREATED]
        errors = {}
        if waiting:
            try:
                errors = _restore_side_by_side(waiting, restore_one)
            finally:
                after_restore_started(rt, sandbox.id)
    if record.id in errors:
        raise errors[record.id]
    current = rt.containers.get(record.id)
    if current.pending_restore or (current.state == ContainerState.EXITED and current.reason == "RestoreFailed"):
        raise FailedPrecondition(f"container {record.id} was restored with its pod and failed: {current.message}")
    return True


def _restore_side_by_side(waiting: list, restore_one) -> dict[str, Exception]:
    errors: dict[str, Exception] = {}
    with ThreadPoolExecutor(max_workers=len(waiting), thread_name_prefix="pod-restore") as pool:
        futures = [(r, pool.submit(restore_one, r)) for r in waiting]
        for r, future in futures:
            error = future.exception()
            if error is not None:
                errors[r.id] = error
    if errors:
        log.warning("pod restore: some containers failed", extra={
            "containers": {cid: getattr(e, "message", str(e)) for cid, e in errors.items()}})
    return errors


def _group_path(sandbox) -> Path:
    return Path(sandbox.pin_dir) / GROUP_FILE


def _read_group(sandbox) -> list[str]:
    try:
        doc = json.loads(_group_path(sandbox).read_text())
    except (FileNotFoundError, ValueError):
        return []
    ids = doc.get("containers") if isinstance(doc, dict) else None
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


def _lock_for(sandbox_id: str) -> _PodLock:
    with _locks_guard:
        lock = _locks.get(sandbox_id)
        if lock is None:
            lock = _locks[sandbox_id] = _PodLock()
        return lock
