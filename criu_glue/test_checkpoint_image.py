import gzip
import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path

import pytest
import zstandard

import criu_glue.checkpoint_image as ci
from criu_glue.archive import open_archive, write_archive
from criu_glue.archive_format import CheckpointConfig, format_rfc3339_ns
from criu_glue.checkpoint_image import (ANNOTATION_CHECKPOINTCTL_NAME, ANNOTATION_CRIO_NAME,
                                        ANNOTATION_PODMAN_NAME, CHECKPOINT_ANNOTATIONS,
                                        CheckpointImageError, build_checkpoint_image,
                                        documents_for_written_archive,
                                        checkpoint_name_of, is_checkpoint_image)
from criu_glue.errors import ArchiveFormatError, ArchiveLimitExceeded, UnsafeArchive
from criu_glue.limits import Limits
from criu_glue.test_archive import base_entries, checkpoint_entries, prepare_members, tar_of
from oci.image_config import ImageConfig
from oci.store import ImageRecord, ImageStore

TAG = "127.0.0.1:5000/checkpoints/app:ck1"


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="checkpoint-image-test-") as d:
        yield Path(d)


@pytest.fixture
def store(tmp_path):
    s = ImageStore(tmp_path / "store")
    yield s
    s.close()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def archive_of(tmp_path: Path, compression: str = "none", spec_annotations=None) -> Path:
    members = prepare_members(tmp_path)
    if spec_annotations is not None:
        spec = json.loads((members / "spec.dump").read_bytes())
        spec["annotations"] = spec_annotations
        (members / "spec.dump").write_text(json.dumps(spec))
    out = tmp_path / f"checkpoint-{compression}.tar"
    write_archive(out, members, compression)
    return out


def store_is_empty(store: ImageStore) -> bool:
    blobs = [p for p in (store.root / "blobs").rglob("*") if p.is_file()]
    return store.list() == [] and blobs == [] and list((store.root / "tmp").iterdir()) == []


# ---------------------------------------------------------------- building

def test_build_from_an_archive_gives_a_one_layer_annotated_image(tmp_path, store):
    archive = archive_of(tmp_path, spec_annotations={
        "io.kubernetes.cri.container-name": "app", "io.kubernetes.cri.sandbox-name": "web-pod",
        "io.kubernetes.cri.sandbox-namespace": "shop"})
    image = build_checkpoint_image(store, archive, TAG)

    assert image.repo_tags == [TAG] and image.repo_digests == []
    assert store.get(TAG) == image
    assert len(image.layers) == 1
    layer = image.layers[0]
    raw = archive.read_bytes()
    # A plain archive is stored as is: the layer is the archive, byte for byte.
    assert layer.media_type == "application/vnd.oci.image.layer.v1.tar"
    assert layer.digest == layer.diff_id == sha256(raw) and layer.size == len(raw)
    assert store.blob_path(layer.digest).read_bytes() == raw

    expected = {ANNOTATION_CRIO_NAME: "app", ANNOTATION_CHECKPOINTCTL_NAME: "app",
                ANNOTATION_PODMAN_NAME: "app",
                "org.criu.checkpoint.engine.name": "containerd",
                "org.criu.checkpoint.pod.name": "web-pod",
                "org.criu.checkpoint.pod.namespace": "shop",
                "org.criu.checkpoint.rootfsImageID": "sha256:abc",
                "org.criu.checkpoint.rootfsImageUserRequested": "docker.io/library/busybox:1.36",
                "org.criu.checkpoint.runtime.name": "runc"}
    assert image.annotations == expected
    manifest = json.loads(store.manifest_bytes(image))
    assert manifest["annotations"] == expected and len(manifest["layers"]) == 1
    config = json.loads(store.config_bytes(image))
    assert config["os"] == "linux" and config["architecture"] == ci.host_architecture()
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer.diff_id]}
    assert config["config"]["Labels"] == expected
    # Created = checkpointed: building the same archive again gives the same image.
    assert config["created"] == format_rfc3339_ns(1_700_000_100_5)
    assert checkpoint_name_of(image) == "app" and is_checkpoint_image(image)

    # What restore does: open the single layer's blob as a checkpoint archive.
    with open_archive(archive) as original, open_archive(store.blob_path(layer.digest)) as cp:
        assert cp.config() == original.config()
        assert cp.spec() == original.spec()
        assert cp.member_names() == original.member_names()


def test_podman_archive_annotations(tmp_path, store):
    """Podman's config.dump is libpod's container config: the image ID is rootfsImageID."""
    image_id = "9d2a" * 16
    entries = [*checkpoint_entries(),
               ("config.dump", json.dumps({"id": "5e1f", "name": "web", "rootfsImageID": image_id,
                                           "rootfsImageName": "quay.io/app:1", "runtime": "crun"}).encode()),
               ("spec.dump", json.dumps({"annotations": {"io.container.manager": "libpod"}}).encode())]
    archive = tmp_path / "podman.tar.zst"
    archive.write_bytes(tar_of(entries, "zstd"))
    image = build_checkpoint_image(store, archive, "web:ck")
    assert image.layers[0].media_type.endswith("+zstd")
    assert image.annotations == {ANNOTATION_CRIO_NAME: "web", ANNOTATION_CHECKPOINTCTL_NAME: "web",
                                 ANNOTATION_PODMAN_NAME: "web",
                                 "org.criu.checkpoint.engine.name": "Podman",
                                 "org.criu.checkpoint.rootfsImageName": "quay.io/app:1",
                                 "org.criu.checkpoint.rootfsImageID": image_id,
                                 "org.criu.checkpoint.runtime.name": "crun"}


@pytest.mark.parametrize("source", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("layer", ["keep", "none", "gzip", "zstd"])
def test_every_archive_compression_to_every_layer_compression(tmp_path, store, source, layer):
    archive = archive_of(tmp_path, source)
    image = build_checkpoint_image(store, archive, TAG, compression=layer)
    stored = image.layers[0]
    effective = source if layer == "keep" else layer
    suffix = {"none": "", "gzip": "+gzip", "zstd": "+zstd"}[effective]
    assert stored.media_type == "application/vnd.oci.image.layer.v1.tar" + suffix
    blob = store.blob_path(stored.digest).read_bytes()
    if layer == "keep":
        assert blob == archive.read_bytes()
    plain = {"none": lambda b: b, "gzip": gzip.decompress,
             "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)}
    assert stored.diff_id == sha256(plain[effective](blob))
    assert stored.diff_id == sha256(plain[source](archive.read_bytes()))
    with open_archive(store.blob_path(stored.digest)) as cp:
        assert cp.compression == effective
        assert cp.config().name == "app"
    # The store's own check of a layer (unpacking verifies the diff_id) accepts it too.
    assert (store.layer_paths(image)[0] / "config.dump").is_file()


def test_same_archive_twice_is_one_image_with_both_tags(tmp_path, store):
    archive = archive_of(tmp_path)
    first = build_checkpoint_image(store, archive, "ck:one")
    second = build_checkpoint_image(store, archive, "ck:two")
    assert first.id == second.id
    assert second.repo_tags == ["docker.io/library/ck:one", "docker.io/library/ck:two"]
    assert len(store.list()) == 1


def test_the_tag_comes_only_from_the_caller(tmp_path, store):
    """Nothing in the archive (container name, image names) may name or move a tag."""
    members = prepare_members(tmp_path)
    (members / "config.dump").write_bytes(CheckpointConfig(
        id="x", name="docker.io/library/victim:latest", rootfs_image="victim:latest",
        rootfs_image_name="docker.io/library/victim:latest").to_json())
    archive = tmp_path / "cp.tar"
    write_archive(archive, members)
    from oci.test_store import make_image
    victim = make_image(store, [{"bin/sh": b"sh"}], tags=["victim:latest"])

    image = build_checkpoint_image(store, archive, "mine:1")
    assert image.repo_tags == ["docker.io/library/mine:1"]
    assert store.get("victim:latest") == victim
    with pytest.raises(CheckpointImageError, match="cannot tag"):
        build_checkpoint_image(store, archive, "mine@sha256:" + "a" * 64)
    with pytest.raises(CheckpointImageError, match="cannot tag"):
        build_checkpoint_image(store, archive, "Not A Name!")


# ---------------------------------------------------------------- hostile and broken archives

@pytest.mark.parametrize("entries,error,match", [
    (base_entries(without=["config.dump"]), ArchiveFormatError, "missing config.dump"),
    (base_entries(without=["checkpoint"]), ArchiveFormatError, "inventory.img"),
    (base_entries() + [("../evil", b"x")], UnsafeArchive, "'..'"),
    (base_entries() + [("/etc/evil", b"x")], UnsafeArchive, "absolute"),
    (base_entries() + [("config.dump", b'{"id": "z", "name": "z"}')], UnsafeArchive, "more than once"),
    ([("config.dump", b"not json")] + base_entries(without=["config.dump"]), ArchiveFormatError,
     "not valid JSON"),
])
def test_hostile_or_broken_archives_are_refused_and_leave_nothing(tmp_path, store, entries, error, match):
    archive = tmp_path / "bad.tar"
    archive.write_bytes(tar_of(entries))
    with pytest.raises(error, match=match) as err:
        build_checkpoint_image(store, archive, TAG)
    assert str(archive) in str(err.value)
    assert store_is_empty(store)


def test_limits_apply_and_missing_files_are_os_errors(tmp_path, store):
    archive = archive_of(tmp_path)
    with pytest.raises(ArchiveLimitExceeded):
        build_checkpoint_image(store, archive, TAG, Limits(max_entries=3))
    with pytest.raises(FileNotFoundError):
        build_checkpoint_image(store, tmp_path / "nope.tar", TAG)
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ArchiveFormatError):
        build_checkpoint_image(store, tmp_path / "empty.tar", TAG)
    assert store_is_empty(store)


def test_archive_changed_while_copied_is_refused(tmp_path, store, monkeypatch):
    archive = archive_of(tmp_path)
    real_copy = ci._copy

    def copy_then_append(source, sink):
        yield from real_copy(source, sink)
        with open(archive, "ab") as f:
            f.write(b"\0" * 512)

    monkeypatch.setattr(ci, "_copy", copy_then_append)
    with pytest.raises(CheckpointImageError, match="changed while"):
        build_checkpoint_image(store, archive, TAG)
    assert store_is_empty(store)


def test_gunzip_sink_handles_several_members_padding_and_bombs():
    data = [os.urandom(1000), b"\0" * (8 << 20), b"tail"]
    stream = b"".join(gzip.compress(d) for d in data[:2]) + b"\0" * 1024 + gzip.compress(data[2])
    hasher = hashlib.sha256()
    sink = ci._GunzipSink(hasher)
    for i in range(0, len(stream), 777):
        sink.write(stream[i:i + 777])
    sink.close()
    assert hasher.hexdigest() == hashlib.sha256(b"".join(data)).hexdigest()
    assert len(zlib.compress(data[1])) < 20_000  # the middle member is a little bomb


# ---------------------------------------------------------------- detection

def record(annotations=None, labels=None) -> ImageRecord:
    return ImageRecord(id="sha256:" + "1" * 64, repo_tags=[], repo_digests=[],
                       manifest_digest="sha256:" + "2" * 64,
                       config=ImageConfig(labels=dict(labels or {})), layers=[], size=0,
                       annotations=dict(annotations or {}))


@pytest.mark.parametrize("key", CHECKPOINT_ANNOTATIONS)
def test_each_engines_key_marks_a_checkpoint_image_wherever_it_is(key):
    for image, config_annotations in ((record(annotations={key: "ctr"}), None),
                                      (record(labels={key: "ctr"}), None),
                                      (record(), {key: "ctr"})):
        assert checkpoint_name_of(image, config_annotations) == "ctr"
        assert is_checkpoint_image(image, config_annotations)
    # Presence is what counts, as in CRI-O: an empty name still marks a checkpoint image.
    assert checkpoint_name_of(record(annotations={key: ""})) == ""
    assert is_checkpoint_image(record(annotations={key: ""}))


def test_ordinary_images_are_not_checkpoint_images(store):
    from oci.test_store import make_image
    plain = make_image(store, [{"bin/sh": b"sh"}], tags=["busybox:1"],
                       manifest_annotations={"org.opencontainers.image.title": "busybox",
                                             "org.criu.checkpoint.engine.name": "podman"},
                       index_annotations={"io.kubernetes.cri-o.annotations.other": "x"})
    assert checkpoint_name_of(plain) is None and not is_checkpoint_image(plain)
    assert checkpoint_name_of(record(), {"unrelated": "x"}) is None


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_documents_for_a_written_archive_match_a_build_without_reading_it_again(tmp_path, store, compression,
                                                                                monkeypatch):
    members = prepare_members(tmp_path)
    archive = tmp_path / "cp.tar"
    written = write_archive(archive, members, compression)
    built = build_checkpoint_image(store, archive, TAG)
    documents = documents_for_written_archive(archive, written)
    # The same image as a build of the same archive would record: same manifest, same config.
    assert documents.manifest == store.manifest_bytes(built)
    assert documents.config == store.config_bytes(built)
    sources = documents.blob_sources()
    assert set(sources) == {written.digest, built.config_digest}
    with sources[written.digest]() as layer:
        assert layer.read() == archive.read_bytes()
    assert sources[built.config_digest]().read() == documents.config


def test_documents_refuse_an_archive_whose_size_changed_since_it_was_written(tmp_path):
    archive = tmp_path / "cp.tar"
    written = write_archive(archive, prepare_members(tmp_path))
    with open(archive, "ab") as f:
        f.write(b"\0" * 10240)
    with pytest.raises(CheckpointImageError, match="changed since"):
        documents_for_written_archive(archive, written)
