"""PullImage under the intent journal: a pull killed half-way leaves nothing the store would use or keep.

The image store already never uses a partial blob: blobs are written to `<store>/tmp/` and renamed
into place only once their digest checks, and the store clears `tmp/` when it opens as the root's
sole user (oci/store.py). What a killed pull can still leave is complete blobs that no image
references (the image was never recorded). The pull announces which blobs it will add before
downloading them; recovery deletes those that no image references, so the retried pull starts
clean and the store holds nothing no record owns.
"""
from __future__ import annotations

import logging

from pyshim.internal import crashpoints
from pyshim.internal.intents import Intent, IntentJournal, Operation

log = logging.getLogger(__name__)

# The steps of a pull, each announced (and a crash point `pull_image:<step>`) before it is taken.
PULL_STEPS = ("begin", "blobs", "blob_partial", "record")


class ImagePuller:
    """The daemon's puller: oci.registry.RegistryClient.pull, journaled."""

    def __init__(self, client, store, intents: IntentJournal):
        self._client = client  # oci.registry.RegistryClient
        self._store = store  # oci.store.ImageStore
        self._intents = intents

    def pull(self, store, ref: str, auth=None, blob_tap=None):
        with self._intents.track(Operation.PULL_IMAGE, ref) as intent:
            image = self._client.pull(store, ref, auth,
                                      on_step=lambda step, **facts: self._intents.advance(intent, step, **facts),
                                      blob_tap=blob_tap)
            crashpoints.reached("pull_image:recorded")  # recorded, intent still open: recovery keeps it
            return image

    def recover(self, intents: list[Intent]) -> None:
        """At start-up: delete the blobs that interrupted pulls added and no image references."""
        for intent in intents:
            if intent.operation != Operation.PULL_IMAGE:
                continue
            blobs = [d for d in intent.facts.get("new_blobs", "").split(",") if d]
            try:
                self._store.discard_unreferenced_blobs(blobs)
            except Exception as e:  # noqa: BLE001 - the daemon starts; the next start retries
                log.error("recovery: could not clean up after an interrupted image pull",
                          extra={"image": intent.target, "error": str(e)})
                continue
            log.warning("recovery: PullImage interrupted; deleted the blobs it added that no image uses",
                        extra={"image": intent.target, "step": intent.step, "blobs": len(blobs)})
            self._intents.finish(intent)
