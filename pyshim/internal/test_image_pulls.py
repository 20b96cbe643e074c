"""Recovery of an interrupted pull: the blobs it announced go unless an image references them."""
import hashlib
import io
import json
import tempfile
from pathlib import Path

import pytest

from oci.store import ImageStore
from pyshim.internal.image_pulls import ImagePuller
from pyshim.internal.intents import IntentJournal, Operation


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="pyshim-pulls-test-") as d:
        yield Path(d)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stored_image(store: ImageStore) -> tuple[str, str]:
    """An image with one (empty) layer; returns its layer and config digests."""
    layer = b"\0" * 1024  # an empty tar
    store.write_blob(io.BytesIO(layer), sha(layer), len(layer))
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": sha(layer), "size": len(layer)}]}).encode()
    store.add_image(manifest, config, ["example.org/kept:1"])
    return sha(layer), sha(config)


def test_recovery_deletes_the_blobs_of_an_unrecorded_pull_and_keeps_used_ones(tmp_path):
    store = ImageStore(tmp_path / "store")
    journal = IntentJournal(tmp_path / "intents")
    used_layer, _ = stored_image(store)
    orphan = b"a layer of an image never recorded"
    store.write_blob(io.BytesIO(orphan), sha(orphan), len(orphan))
    intent = journal.begin(Operation.PULL_IMAGE, "example.org/lost:1")
    journal.advance(intent, "record", new_blobs=f"{sha(orphan)},{used_layer}")

    ImagePuller(client=None, store=store, intents=journal).recover(journal.pending())

    assert not store.has_blob(sha(orphan))
    assert store.has_blob(used_layer)  # shared with a recorded image: kept
    assert [i.repo_tags for i in store.list()] == [["example.org/kept:1"]]
    assert journal.pending() == []


def test_recovery_leaves_other_operations_intents_alone(tmp_path):
    journal = IntentJournal(tmp_path / "intents")
    journal.begin(Operation.CREATE_CONTAINER, "c1")
    ImagePuller(client=None, store=ImageStore(tmp_path / "store"), intents=journal).recover(journal.pending())
    assert [i.operation for i in journal.pending()] == [Operation.CREATE_CONTAINER]


class _Chunks(io.RawIOBase):
    def __init__(self, chunks):
        self._chunks = list(chunks)

    def read(self, n=-1):
        return self._chunks.pop(0) if self._chunks else b""


def test_the_partial_download_hook_fires_once_after_the_first_chunk():
    from oci.registry import _AfterFirstChunk

    calls = []
    stream = _AfterFirstChunk(_Chunks([b"one", b"two", b"three"]), lambda: calls.append(len(calls)))
    assert stream.read(3) == b"one" and calls == []
    assert stream.read(3) == b"two" and calls == [0]
    assert stream.read(3) == b"three" and stream.read(3) == b"" and calls == [0]
