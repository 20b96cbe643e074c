import io
import json
import tarfile
import tempfile
from pathlib import Path

import pytest

from oci.digest import digest_of
from oci.errors import ImageError
from oci.layout import archive_layout, import_oci_archive, write_oci_layout
from oci.store import ImageStore


@pytest.fixture
def tmp_path():
    """Replaces pytest's tmp_path, which keeps the last runs' directories: tests leave nothing."""
    with tempfile.TemporaryDirectory(prefix="pyshim-oci-test-") as d:
        yield Path(d)


def layer(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / f"{name}.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    return path


def config(cmd: str) -> dict:
    return {"config": {"Cmd": [cmd]}}


def test_layout_with_several_images_imports_all(tmp_path):
    layout = tmp_path / "layout"
    write_oci_layout(layout, [layer(tmp_path, "a", b"a")], config("a"), "example.com/a:1")
    write_oci_layout(layout, [layer(tmp_path, "b", b"b")], config("b"), "example.com/b:1")
    # Same ref name again: replaces the earlier entry instead of adding a third image.
    write_oci_layout(layout, [layer(tmp_path, "b", b"b2")], config("b2"), "example.com/b:1")
    assert len(json.loads((layout / "index.json").read_text())["manifests"]) == 2

    store = ImageStore(tmp_path / "store")
    images = import_oci_archive(store, archive_layout(layout, tmp_path / "l.tar"))
    assert [(i.repo_tags, i.config.cmd) for i in images] == [
        (["example.com/a:1"], ["a"]), (["example.com/b:1"], ["b2"])]
    # The replaced image's blobs were in the archive but belong to no image: not kept.
    kept = set().union(*(i.blob_digests() for i in images))
    stored = {f"sha256:{p.name}" for p in (store.root / "blobs/sha256").iterdir()}
    assert stored == kept
    with pytest.raises(ImageError, match="holds 2 images"):
        import_oci_archive(store, layout, tag="x:1")


def test_nested_index_resolves_platform(tmp_path):
    layout = tmp_path / "layout"
    write_oci_layout(layout, [layer(tmp_path, "amd", b"amd")], config("amd"), "amd")
    write_oci_layout(layout, [layer(tmp_path, "arm", b"arm")],
                     {**config("arm"), "architecture": "arm64"}, "arm")
    top = json.loads((layout / "index.json").read_text())
    nested = json.dumps({"schemaVersion": 2, "mediaType": top["mediaType"],
                         "manifests": top["manifests"]}).encode()
    (layout / "blobs/sha256" / digest_of(nested)[7:]).write_bytes(nested)
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest_of(nested),
            "size": len(nested), "annotations": {"org.opencontainers.image.ref.name": "multi/app:2"}}]}))

    [image] = import_oci_archive(ImageStore(tmp_path / "store"), layout)
    assert image.config.cmd == ["amd"]
    assert image.repo_tags == ["docker.io/multi/app:2"]


def test_not_a_layout(tmp_path):
    store = ImageStore(tmp_path / "store")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no oci-layout"):
        import_oci_archive(store, tmp_path / "empty")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ImageError, match="not a readable tar"):
        import_oci_archive(store, tmp_path / "junk.tar")
    with pytest.raises(ImageError, match="does not exist"):
        import_oci_archive(store, tmp_path / "missing.tar")
