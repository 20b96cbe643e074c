"""Checkpoint images end to end: a real checkpoint becomes an image with `pyshim checkpoint-image build`
beside the running daemon, travels through a real registry, and comes back by PullImage with its annotations.

Restoring from the image is tested with restore itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

from criu_glue.archive import open_archive
from criu_glue.checkpoint_image import CHECKPOINT_ANNOTATIONS
from cri_api import api_pb2 as cri
from integration.test_checkpoint import checkpoint
from integration.test_lifecycle import cleanup, run_container
from oci.store import ImageStore


def pyshim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyshim", *args], capture_output=True, text=True, timeout=300)


def image_status(client, image: str, verbose: bool = False) -> "cri.ImageStatusResponse":
    return client.images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=image), verbose=verbose),
                                     timeout=client.timeout)


def remove_image(client, image: str) -> None:
    client.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image)), timeout=client.timeout)


def assert_checkpoint_annotations(annotations, pod) -> None:
    for key in CHECKPOINT_ANNOTATIONS:
        assert annotations.get(key) == "main", (key, dict(annotations))
    assert annotations["org.criu.checkpoint.engine.name"] == "pyshim"
    assert annotations["org.criu.checkpoint.pod.name"] == pod.metadata.name
    assert annotations["org.criu.checkpoint.pod.namespace"] == "default"
    assert "busybox" in annotations["org.criu.checkpoint.rootfsImageName"]
    assert annotations["org.criu.checkpoint.rootfsImageID"]
    assert annotations["org.criu.checkpoint.runtime.name"] == "runc"


def test_checkpoint_image_build_list_push_remove_pull(client, daemon, registry, pulled_busybox, tmp_path):
    pod, pod_id, cid = run_container(client, pulled_busybox,
                                     ["sh", "-c", "i=0; while true; do echo $i > /tmp/n; i=$((i+1)); sleep 0.1; done"])
    try:
        time.sleep(0.5)
        archive = tmp_path / "checkpoint.tar"
        checkpoint(client, cid, archive)
    finally:
        cleanup(client, pod_id)

    tag = f"{registry.address}/checkpoints/ctr-{uuid.uuid4().hex[:8]}:v1"
    root = str(daemon.settings.root)
    # Built by another process while the daemon runs: the daemon must see it without a restart.
    built = pyshim("checkpoint-image", "build", str(archive), "--tag", tag, "--root", root)
    assert built.returncode == 0, built.stderr
    try:
        listed = [i for i in client.images.ListImages(cri.ListImagesRequest(), timeout=client.timeout).images
                  if tag in i.repo_tags]
        assert len(listed) == 1, "the running daemon does not list the image built beside it"
        image_id = listed[0].id
        assert_checkpoint_annotations(listed[0].spec.annotations, pod)
        status = image_status(client, tag, verbose=True)
        assert status.image.id == image_id and list(status.image.repo_tags) == [tag]
        assert_checkpoint_annotations(status.image.spec.annotations, pod)
        assert len(json.loads(status.info["info"])["layers"]) == 1

        # The single layer is the archive: restore opens it as one.
        store = ImageStore(daemon.settings.root / "images")
        try:
            layer = store.get(tag).layers[0]
            with open_archive(store.blob_path(layer.digest)) as cp, open_archive(archive) as original:
                assert cp.config() == original.config() and cp.config().id == cid
                assert cp.member_names() == original.member_names()
        finally:
            store.close()

        pushed = pyshim("checkpoint-image", "push", tag, "--root", root)
        assert pushed.returncode == 0, pushed.stderr
        repo_digest = pushed.stdout.strip()
        assert repo_digest.startswith(tag.rsplit(":", 1)[0] + "@sha256:")
        assert list(image_status(client, tag).image.repo_digests) == [repo_digest]

        remove_image(client, tag)
        assert not image_status(client, tag).HasField("image")
        assert not image_status(client, image_id).HasField("image")

        assert client.pull(tag) == image_id
        status = image_status(client, tag)
        assert status.image.id == image_id
        assert list(status.image.repo_digests) == [repo_digest]
        assert_checkpoint_annotations(status.image.spec.annotations, pod)
    finally:
        remove_image(client, tag)
    assert not image_status(client, tag).HasField("image")


def test_checkpoint_image_cli_refuses_bad_input_with_one_line(daemon, pulled_busybox, tmp_path):
    root = str(daemon.settings.root)
    not_an_archive = tmp_path / "notes.tar"
    not_an_archive.write_bytes(b"just text, not a tar" * 100)
    for args, words in (
            (("build", str(tmp_path / "missing.tar"), "--tag", "ck:1"), "does not exist"),
            (("build", str(not_an_archive), "--tag", "ck:1"), "not a readable"),
            (("push", "never-built:1"), "no image never-built:1"),
            (("push", pulled_busybox), "not a checkpoint image")):
        result = pyshim("checkpoint-image", *args, "--root", root)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pyshim checkpoint-image ") and words in lines[0], result.stderr
    with daemon.client() as c:
        assert not [i for i in c.images.ListImages(cri.ListImagesRequest()).images if "ck" in " ".join(i.repo_tags)]
