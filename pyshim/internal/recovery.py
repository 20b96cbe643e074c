"""Start-up recovery: make the records and the machine agree again after the daemon was killed.

Runs once in `pyshim/daemon.py build_runtime`, before the CRI socket is served, so that no call
ever sees a half-done operation. Each owner repairs its own intents (pyshim/internal/intents.py)
and sweeps what no record of its kind owns; every repair is one WARNING line naming what was found
and what was done. Every step is idempotent: a daemon killed during recovery recovers again.

Order matters:
1. pod sandboxes (netns, IPs, CNI cache, pod dirs, cgroups): a container's repair may need its pod;
2. the image store (partial pulls and receives): a restore's retry may need its base image whole;
3. checkpoints (CheckpointPod's, then CheckpointContainer's): a container frozen by a killed checkpoint is thawed before the containers are
   reconciled, so that runc's state read there is the truth (running, not paused);
4. restores cut short (the restore engine, pyshim/checkpoint_restore/restore.py);
5. containers: creates, starts and removals cut short, then every record against runc and
   conmon, then runc containers and dirs no record owns;
6. RestorePods that never answered (pyshim/checkpoint_restore/pod_restore_journal.py): their
   containers and sandbox are removed, now that the records agree with runc.
"""
from __future__ import annotations

import logging
import time

from pyshim.checkpoint_restore import pod_restore_journal
from pyshim.internal import image_receives
from pyshim.internal.intents import IntentJournal
from pyshim.internal.state import ContainerState

log = logging.getLogger(__name__)


def recover(parts, journal: IntentJournal) -> float:
    """Repair what a killed daemon left; `parts` has sandboxes, registry, checkpointers, restores, containers.
    Returns the seconds it took."""
    started = time.monotonic()
    pending = journal.pending()
    if pending:
        log.warning("recovery: open intents of a previous daemon found", extra={
            "count": len(pending), "intents": [f"{i.operation.value}:{i.step} {i.target}" for i in pending]})
    parts.sandboxes.recover(pending)
    parts.registry.recover(pending)  # the journaled puller (pyshim/internal/image_pulls.py)
    image_receives.recover(parts.images, journal, pending)  # killed `checkpoint-image receive`s
    stopped_by_checkpoints = parts.pod_checkpointer.recover() + parts.checkpointer.recover(pending)
    parts.restores.recover(pending)
    parts.containers.recover(pending)
    # RestorePods that never answered: their sandbox and containers go, through the normal remove paths.
    pod_restore_journal.recover(journal, pending, parts.containers, parts.sandboxes)
    for stopped in stopped_by_checkpoints:  # their exits are recorded now: say why they ended
        parts.containers.note_stopped_by_checkpoint(stopped.container_id, stopped.checkpoint)
    # Lazy checkpoints (migrate --lazy) whose CRIU serves or served pages, once the records say what runs.
    if parts.lazy_checkpoints is not None:
        parts.lazy_checkpoints.recover(pending, {c.id for c in parts.containers.all()
                                                 if c.state == ContainerState.RUNNING})
    # Lazy restores' page sources, once the records say which containers still run.
    parts.restores.recover_lazy_pages()
    # Pod cgroups that only became empty once orphaned containers were removed above.
    parts.sandboxes.sweep_cgroups()
    seconds = time.monotonic() - started
    log.info("recovery done", extra={"ms": round(seconds * 1000, 1), "intents": len(pending)})
    return seconds
