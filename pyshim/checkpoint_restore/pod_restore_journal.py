"""RestorePod's intent: what a RestorePod call is making, written down before it is made, and the
start-up repair of a call a killed daemon left open.

A RestorePod creates a sandbox and containers whose ids the kubelet learns only from the answer. If the
daemon dies before answering, nobody will ever ask to remove them: the kubelet got an error
(connection reset) and retries with a NEW call. So the call journals (pyshim/internal/intents.py,
Operation.RESTORE_POD, target the sandbox id) every id before anything exists: the sandbox's and each
container's, chosen up front and written in one durable write (one fsync, not one per container, on
the call's critical path); the managers then create them under those ids. The intent is closed when
the call returns, with what it made removed on error (`undo`).

At start-up (pyshim/internal/recovery.py, after the containers were reconciled), an open RESTORE_POD
intent means the call never answered: everything it made is removed through the normal remove paths,
the very ones its error path uses (RemoveContainer for each container, StopPodSandbox and
RemovePodSandbox for the sandbox). That includes a call killed after it had made everything but
before its answer left: the kubelet saw a failure and retries, so a restored pod it does not know of
would only be a duplicate holding the pod's name and an IP. Nothing of the checkpoint is touched.

Crash points: `restore_pod:begin` (the ids are journaled, nothing is made yet),
`restore_pod:sandbox_created`, `restore_pod:container_created` (after each container; `#2` is after
the second) and `restore_pod:created` (all made, the answer not yet sent).
"""
from __future__ import annotations

import contextlib
import logging
import secrets
from dataclasses import dataclass

from pyshim.internal.intents import Intent, IntentJournal, Operation

log = logging.getLogger(__name__)

STEP_BEGIN = "begin"
FACT_CHECKPOINT = "checkpoint"
FACT_CONTAINERS = "containers"

CRASH_SANDBOX_CREATED = "restore_pod:sandbox_created"
CRASH_CONTAINER_CREATED = "restore_pod:container_created"
CRASH_CREATED = "restore_pod:created"


@dataclass(frozen=True)
class InterruptedPodRestore:
    """What an open RESTORE_POD intent says the call may have made."""
    sandbox_id: str
    container_ids: tuple[str, ...]
    checkpoint: str

    @classmethod
    def from_intent(cls, intent: Intent) -> "InterruptedPodRestore":
        ids = tuple(c for c in intent.facts.get(FACT_CONTAINERS, "").split(",") if c)
        return cls(intent.target, ids, intent.facts.get(FACT_CHECKPOINT, ""))


class PodRestoreIntent:
    """One RestorePod call's open intent: it hands out the ids it has journaled, and undoes."""

    def __init__(self, intent: Intent, container_ids: list[str]):
        self._intent = intent
        self.container_ids = container_ids  # journaled, in the order they are handed out
        self._handed_out = 0
        self.left: list[str] = []  # what the undo could not remove

    @property
    def sandbox_id(self) -> str:
        return self._intent.target

    def next_container_id(self) -> str:
        """The id of the next container to create, durable in the intent already."""
        container_id = self.container_ids[self._handed_out]
        self._handed_out += 1
        return container_id

    def undo(self, containers, sandboxes) -> None:
        """The call failed: remove everything it made (see `undo`)."""
        self.left = undo(containers, sandboxes, self.sandbox_id, self.container_ids)


@contextlib.contextmanager
def track(journal: IntentJournal, checkpoint_path: str, containers: int):
    """The intent of one RestorePod making a sandbox and `containers` containers, open for the block;
    it names fresh ids for all of them before the block makes anything. Closed when the block ends, by
    returning or by raising after PodRestoreIntent.undo; an undo that could not remove everything
    leaves it open, so that the next start tries again."""
    container_ids = [secrets.token_hex(32) for _ in range(containers)]
    intent = journal.begin(Operation.RESTORE_POD, secrets.token_hex(32), step=STEP_BEGIN,
                           **{FACT_CHECKPOINT: checkpoint_path, FACT_CONTAINERS: ",".join(container_ids)})
    restore = PodRestoreIntent(intent, container_ids)
    try:
        yield restore
    finally:
        if not restore.left:
            journal.finish(intent)


def undo(containers, sandboxes, sandbox_id: str, container_ids) -> list[str]:
    """Remove what a RestorePod made, through the normal remove paths: every container it named or
    that is in its sandbox, then the sandbox (stop, remove). Best effort, all of it is tried;
    returns what could not be removed (empty: nothing is left)."""
    left: list[str] = []
    ids = list(dict.fromkeys([*container_ids, *(c.id for c in containers.in_sandbox(sandbox_id))]))
    for container_id in ids:
        try:
            if containers.find(container_id) is not None:
                containers.remove(container_id)
            elif containers.container_dir(container_id).exists():
                # Its directory made, its record not saved (a kill in between): whatever it left.
                containers.remove_leftovers(container_id, "")
        except Exception as e:  # noqa: BLE001 - undo as much as possible
            log.exception("RestorePod undo: cannot remove container", extra={"container": container_id})
            left.append(f"container {container_id}: {getattr(e, 'message', e)}")
    if sandboxes.find(sandbox_id) is not None:
        try:
            sandboxes.stop(sandbox_id)
            sandboxes.remove(sandbox_id)
        except Exception as e:  # noqa: BLE001
            log.exception("RestorePod undo: cannot remove sandbox", extra={"sandbox": sandbox_id})
            left.append(f"sandbox {sandbox_id}: {getattr(e, 'message', e)}")
    return left


def recover(journal: IntentJournal, pending: list[Intent], containers, sandboxes) -> None:
    """Start-up repair: remove what every RestorePod a killed daemon left open made, then close its
    intent. One whose removal fails stays open (logged) for the next start."""
    for intent in pending:
        if intent.operation != Operation.RESTORE_POD:
            continue
        interrupted = InterruptedPodRestore.from_intent(intent)
        left = undo(containers, sandboxes, interrupted.sandbox_id, interrupted.container_ids)
        if left:
            log.error("recovery: RestorePod interrupted; could not remove all it made, will retry at next start",
                      extra={"sandbox": interrupted.sandbox_id, "left": left, "intent": intent.id})
            continue
        journal.finish(intent)
        log.warning("recovery: RestorePod interrupted before it answered; removed the sandbox and containers it "
                    "made (the kubelet retries with a new call)",
                    extra={"sandbox": interrupted.sandbox_id, "containers": list(interrupted.container_ids),
                           "step": intent.step, "checkpoint": interrupted.checkpoint})

