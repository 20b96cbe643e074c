"""`pyshim checkpoint-image receive` under the daemon's intent journal: a receiver killed mid-stream
leaves nothing that the daemon's start-up recovery does not collect.

The receiver is its own process (`migrate --direct` runs it through ssh or any pipe) writing into the
daemon's image store while the daemon runs. Killed, it can leave a partial blob and a half-unpacked
image tree under the store's tmp/ (cleared only by a process that opens the store as its sole user,
never while another receive or import runs), or, killed between storing the blob and recording the
image, a whole blob and its unpacked CRIU images that no image uses (never cleared at all).

So the receive announces itself in the journal of the store's root (`<root>/state/intents/`, where
the daemon's recovery reads) before it writes: the blob's digest, a scratch directory of its own under
the store's tmp/ that holds every partial file, and its pid and start time. At start-up the daemon
removes the scratch directory and the blob (with its unpacked images) unless an image uses it --
only for receivers that are gone: a receive still streaming while the daemon restarts is left alone.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from criu_glue.checkpoint_pull import receive_checkpoint_image
from oci.tree_removal import remove_tree
from pyshim.internal import procs
from pyshim.internal.intents import Intent, IntentJournal, Operation

log = logging.getLogger(__name__)


def receive(store, journal: IntentJournal, stream, tag: str, written, limits):
    """receive_checkpoint_image, journaled; returns the stored image's record."""
    scratch = store.scratch_dir("receive-")
    intent = journal.begin(Operation.RECEIVE_CHECKPOINT_IMAGE, tag, step="stream", digest=written.digest,
                           scratch=str(scratch), pid=str(os.getpid()),
                           started_ns=str(procs.start_time_ns(os.getpid())))
    try:
        return receive_checkpoint_image(store, stream, tag, written, limits, scratch=scratch,
                                        on_stored=lambda: journal.advance(intent, "record"))
    finally:  # done, or undone by receive_checkpoint_image itself: nothing left for recovery
        remove_tree(scratch, ignore_errors=True)
        journal.finish(intent)


def recover(store, journal: IntentJournal, intents: list[Intent]) -> None:
    """At start-up: collect what receivers that were killed left in the store. Idempotent."""
    tmp = (Path(store.root) / "tmp").resolve()
    for intent in intents:
        if intent.operation != Operation.RECEIVE_CHECKPOINT_IMAGE:
            continue
        if _receiver_alive(intent):
            continue  # still streaming (the daemon restarted meanwhile): it cleans up after itself
        scratch = Path(intent.facts.get("scratch", ""))
        if scratch.is_absolute() and scratch.resolve().parent == tmp:  # only ever inside the store's tmp/
            remove_tree(scratch, ignore_errors=True)
        digest = intent.facts.get("digest", "")
        try:
            if digest:
                store.discard_unreferenced_blobs({digest})
        except Exception as e:  # noqa: BLE001 - the daemon starts; the next start retries
            log.error("recovery: could not clean up after a killed checkpoint-image receive",
                      extra={"image": intent.target, "error": str(e)})
            continue
        log.warning("recovery: a checkpoint-image receive was killed; removed its partial files and the "
                    "blob it stored unless an image uses it",
                    extra={"image": intent.target, "step": intent.step, "digest": digest})
        journal.finish(intent)


def _receiver_alive(intent: Intent) -> bool:
    try:
        pid, started = int(intent.facts.get("pid", "0")), int(intent.facts.get("started_ns", "0"))
    except ValueError:
        return False
    return pid > 0 and pid != os.getpid() and started != 0 and procs.start_time_ns(pid) == started
