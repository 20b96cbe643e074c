import hashlib
import io
import json
import os
import tarfile
import tempfile
import threading
from pathlib import Path

import pytest

import oci.store
from oci.errors import DigestMismatch, ImageError, ImageNotFound, InvalidReference
from oci.store import ImageStore

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


@pytest.fixture
def tmp_path():
    """Replaces pytest's tmp_path, which keeps the last runs' directories: tests leave nothing."""
    with tempfile.TemporaryDirectory(prefix="pyshim-oci-test-") as d:
        yield Path(d)


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_image(store: ImageStore, layers: list[dict[str, bytes]], tags=(), repo_digests=(),
               cmd=("sh",), manifest_annotations=None, index_annotations=None,
               diff_id_override=None):
    """Store the layer blobs, then add an image whose manifest/config describe them."""
    descriptors, diff_ids = [], []
    for files in layers:
        blob = layer_tar(files)
        store.write_blob(io.BytesIO(blob), sha(blob), len(blob))
        descriptors.append({"mediaType": LAYER_TAR, "digest": sha(blob), "size": len(blob)})
        diff_ids.append(sha(blob))
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": list(cmd)},
                         "rootfs": {"type": "layers",
                                    "diff_ids": diff_id_override or diff_ids}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": sha(config), "size": len(config)},
                "layers": descriptors}
    if manifest_annotations:
        manifest["annotations"] = manifest_annotations
    raw = json.dumps(manifest).encode()
    return store.add_image(raw, config, list(tags), list(repo_digests), index_annotations)


BASE = {"bin/busybox": b"ELF busybox"}


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "store")


def test_add_and_get_by_every_kind_of_name(store):
    image = make_image(store, [BASE, {"etc/passwd": b"root:x:0:0"}], tags=["busybox"],
                       repo_digests=["busybox@sha256:" + "d" * 64])
    hexid = image.id.removeprefix("sha256:")
    assert image.repo_tags == ["docker.io/library/busybox:latest"]
    assert image.repo_digests == ["docker.io/library/busybox@sha256:" + "d" * 64]
    assert image.config.cmd == ["sh"]
    assert [layer.size for layer in image.layers] == [
        os.path.getsize(store.blob_path(layer.digest)) for layer in image.layers]
    for key in ["busybox", "busybox:latest", "docker.io/library/busybox:latest",
                image.id, hexid, hexid[:12], "sha256:" + hexid[:12],
                "busybox@sha256:" + "d" * 64,  # the repo digest
                f"busybox@{image.manifest_digest}"]:  # the platform manifest itself
        assert store.get(key) == image, key
    for key in ["busybox:other", "alpine", hexid[:11], "sha256:" + "0" * 64, "", "Not A Ref!",
                f"alpine@{image.manifest_digest}"]:
        assert store.get(key) is None, key


def test_id_prefixes_need_12_chars_and_must_be_unambiguous(store, monkeypatch):
    images = [make_image(store, [{f"f{i}": bytes([i])}]) for i in range(40)]
    ids = [i.id.removeprefix("sha256:") for i in images]
    assert all(store.get(i[:12]).id == f"sha256:{i}" for i in ids)
    assert all(store.get(i[:11]) is None for i in ids)
    # Real 12-char collisions cannot be manufactured; lower the minimum to make some.
    monkeypatch.setattr(oci.store, "_MIN_ID_PREFIX", 1)
    shared = next(i[:1] for i in ids if sum(j.startswith(i[:1]) for j in ids) > 1)
    unique = next(i[:1] for i in ids if sum(j.startswith(i[:1]) for j in ids) == 1)
    assert store.get(shared) is None
    assert store.get(unique).id.removeprefix("sha256:").startswith(unique)


def test_annotations_merge_manifest_over_index(store):
    image = make_image(store, [BASE], manifest_annotations={"a": "manifest", "m": "1"},
                       index_annotations={"a": "index", "i": "2"})
    assert image.annotations == {"a": "manifest", "m": "1", "i": "2"}


def test_raw_manifest_and_config_are_retrievable(store):
    image = make_image(store, [BASE], manifest_annotations={"io.example/checkpoint": "yes"})
    assert json.loads(store.manifest_bytes(image))["annotations"] == {"io.example/checkpoint": "yes"}
    assert sha(store.manifest_bytes(image)) == image.manifest_digest
    assert json.loads(store.config_bytes(image))["config"]["Cmd"] == ["sh"]


def test_tags_move_between_images(store):
    old = make_image(store, [BASE], tags=["app:v1", "app:stable"], cmd=["old"])
    new = make_image(store, [BASE], tags=["app:stable"], cmd=["new"])
    assert store.get("app:stable") == new
    assert store.get(old.id).repo_tags == ["docker.io/library/app:v1"]
    store.tag(old.id, "app:stable")
    assert store.get("app:stable").id == old.id
    assert store.get(new.id).repo_tags == []
    with pytest.raises(ImageNotFound):
        store.tag("sha256:" + "f" * 64, "app:x")
    with pytest.raises(InvalidReference):
        store.tag(old.id, "app@sha256:" + "f" * 64)


def test_readding_an_image_keeps_its_tags(store):
    first = make_image(store, [BASE], tags=["app:v1"])
    again = make_image(store, [BASE], tags=["app:v2"])
    assert again.id == first.id
    assert again.repo_tags == ["docker.io/library/app:v1", "docker.io/library/app:v2"]
    assert len(store.list()) == 1


def test_remove_collects_only_unshared_blobs_and_layers(store):
    a = make_image(store, [BASE, {"a": b"only in a"}], tags=["a:1", "a:2"])
    b = make_image(store, [BASE, {"b": b"only in b"}], tags=["b:1"])
    a_dirs, b_dirs = store.layer_paths(a), store.layer_paths(b)
    assert a_dirs[0] == b_dirs[0]  # the shared base layer is unpacked once

    assert store.remove("a:2") is True
    assert store.get("a:1") is None and store.get(a.id) is None
    assert store.list() == [b]
    for digest in (a.manifest_digest, a.config_digest, a.layers[1].digest):
        assert not store.has_blob(digest)
    assert not a_dirs[1].exists()
    assert all(store.has_blob(d) for d in b.blob_digests())
    assert all(d.is_dir() for d in b_dirs)

    assert store.remove(b.id) is True
    assert store.remove(b.id) is False
    assert list((store.root / "blobs").rglob("*.*")) == []
    assert [p for p in (store.root / "blobs").rglob("*") if p.is_file()] == []
    assert [p for p in (store.root / "layers").rglob("*") if p.is_dir() and p.parent.name == "sha256"] == []


def test_state_survives_a_new_instance(tmp_path):
    root = tmp_path / "store"
    first = ImageStore(root)
    keep = make_image(first, [BASE], tags=["keep:1"], index_annotations={"k": "v"})
    gone = make_image(first, [{"x": b"x"}], tags=["gone:1"])
    first.remove(gone.id)

    second = ImageStore(root)
    assert second.list() == [keep]
    assert second.get("keep:1").annotations == {"k": "v"}
    assert second.get("gone:1") is None
    assert [p.name for p in root.iterdir() if p.name.startswith(".images-")] == []


def test_image_with_missing_blob_is_dropped_at_load(tmp_path):
    root = tmp_path / "store"
    first = ImageStore(root)
    ok = make_image(first, [BASE], tags=["ok:1"])
    broken = make_image(first, [{"y": b"y"}], tags=["broken:1"])
    first.blob_path(broken.config_digest).unlink()
    assert ImageStore(root).list() == [ok]


def test_concurrent_layer_paths_unpack_each_layer_once(store, monkeypatch):
    image = make_image(store, [BASE, {"etc/x": b"x"}, {"etc/y": b"y"}])
    calls: list[Path] = []
    real_unpack = oci.store.unpack_layer

    def counting_unpack(blob, media_type, dest):
        calls.append(blob)
        threading.Event().wait(0.05)  # widen the window in which a second unpack could start
        return real_unpack(blob, media_type, dest)

    monkeypatch.setattr(oci.store, "unpack_layer", counting_unpack)
    results, barrier = [], threading.Barrier(8)

    def worker():
        barrier.wait()
        results.append(store.layer_paths(image))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r == results[0] for r in results)
    assert sorted(calls) == sorted(store.blob_path(layer.digest) for layer in image.layers)
    assert (results[0][1] / "etc/x").read_bytes() == b"x"
    assert list((store.root / "tmp").iterdir()) == []


def test_layer_whose_content_contradicts_the_config_is_rejected(store):
    wrong = "sha256:" + "e" * 64
    image = make_image(store, [BASE], diff_id_override=[wrong])
    with pytest.raises(DigestMismatch):
        store.layer_paths(image)
    assert not store.layer_path(image.layers[0]).exists()
    assert list((store.root / "tmp").iterdir()) == []


def test_write_blob_verifies_digest_and_size(store):
    data = b"some blob"
    with pytest.raises(DigestMismatch):
        store.write_blob(io.BytesIO(data), "sha256:" + "0" * 64)
    with pytest.raises(DigestMismatch):
        store.write_blob(io.BytesIO(data), sha(data), len(data) - 1)
    with pytest.raises(DigestMismatch):
        store.write_blob(io.BytesIO(data), sha(data), len(data) + 1)
    assert not store.has_blob(sha(data))
    assert list((store.root / "tmp").iterdir()) == []
    assert store.write_blob(io.BytesIO(data)) == sha(data)
    assert store.blob_path(sha(data)).read_bytes() == data

    class Unreadable(io.RawIOBase):
        def read(self, n=-1):
            raise AssertionError("an already stored blob must not be read again")

    assert store.write_blob(Unreadable(), sha(data)) == sha(data)


def test_add_image_refuses_missing_layers_and_wrong_config(store):
    config = b'{"rootfs": {"type": "layers", "diff_ids": ["sha256:' + b"1" * 64 + b'"]}}'
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config),
                   "size": len(config)},
        "layers": [{"mediaType": LAYER_TAR, "digest": "sha256:" + "2" * 64, "size": 3}]}).encode()
    with pytest.raises(ImageError, match="missing"):
        store.add_image(manifest, config, ["x:1"])
    with pytest.raises(DigestMismatch):
        store.add_image(manifest, config + b" ", ["x:1"])
    assert store.list() == []


def test_usage_and_mountpoint(store):
    before_bytes, before_inodes = store.usage()
    image = make_image(store, [BASE, {"etc/big": b"z" * 100_000}])
    store.layer_paths(image)
    after_bytes, after_inodes = store.usage()
    assert after_bytes >= before_bytes + 2 * 100_000  # the blob and its unpacked copy
    assert after_inodes > before_inodes
    assert store.mountpoint == store.root


# ---------------------------------------------------------------- several processes, one root

def test_two_stores_on_one_root_see_each_others_changes(tmp_path):
    """The daemon's store and a CLI's store: what one writes, the other sees at its next lookup."""
    root = tmp_path / "store"
    daemon, cli = ImageStore(root), ImageStore(root)
    try:
        assert daemon.list() == []
        added = make_image(cli, [BASE], tags=["app:v1"], manifest_annotations={"m": "1"})
        assert daemon.get("app:v1") == added
        assert daemon.list() == [added]

        # A rewrite of the same size within the same clock tick is still noticed (the held
        # copy keeps its inode number from being reused by the new file).
        daemon.tag(added.id, "app:v2")
        cli.tag(added.id, "app:v3")
        assert daemon.get("app:v3").repo_tags == [f"docker.io/library/app:{v}" for v in ("v1", "v2", "v3")]
        assert cli.get("app:v2") is not None

        # Modifications start from the newest state: neither side loses the other's image.
        other = make_image(daemon, [{"o": b"other"}], tags=["other:1"])
        assert {i.id for i in cli.list()} == {added.id, other.id}
        assert cli.remove("other:1") is True
        assert daemon.get("other:1") is None
        assert not daemon.has_blob(other.config_digest)
        assert [i.id for i in ImageStore(root).list()] == [added.id]
    finally:
        daemon.close()
        cli.close()


def _add_images_in_child(root: str, prefix: str, count: int) -> None:
    store = ImageStore(Path(root))
    for i in range(count):
        make_image(store, [{f"{prefix}{i}": prefix.encode() * (i + 1)}], tags=[f"{prefix}:{i}"])
    os._exit(0)


def test_concurrent_writers_in_separate_processes_lose_no_update(tmp_path):
    import multiprocessing

    root = tmp_path / "store"
    watcher = ImageStore(root)
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_add_images_in_child, args=(str(root), p, 15)) for p in "abc"]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    expected = {f"docker.io/library/{p}:{i}" for p in "abc" for i in range(15)}
    assert {t for image in watcher.list() for t in image.repo_tags} == expected
    assert {t for image in ImageStore(root).list() for t in image.repo_tags} == expected
    assert [p.name for p in root.iterdir() if p.name.startswith(".images-")] == []


def test_start_up_clears_tmp_only_when_no_other_process_uses_the_root(tmp_path):
    root = tmp_path / "store"
    first = ImageStore(root)
    in_flight = root / "tmp" / "blob-in-flight"
    in_flight.write_bytes(b"half a download")
    second = ImageStore(root)
    assert in_flight.exists(), "a second user of the root removed another's partial download"
    second.close()
    first.close()
    ImageStore(root).close()
    assert list((root / "tmp").iterdir()) == []


def test_unreadable_state_written_by_another_process(tmp_path):
    root = tmp_path / "store"
    store = ImageStore(root)
    image = make_image(store, [BASE], tags=["keep:1"])
    (root / "images.json.new").write_text(json.dumps({"version": 99, "images": {}}))
    os.rename(root / "images.json.new", root / "images.json")
    # Lookups keep the last good state; changes refuse to overwrite what they do not understand.
    assert store.get("keep:1") == image
    with pytest.raises(ImageError, match="version 99"):
        store.tag(image.id, "keep:2")
    with pytest.raises(ImageError, match="version 99"):
        ImageStore(root)
    store.close()
