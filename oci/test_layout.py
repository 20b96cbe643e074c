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


def _multi_tag_layout(tmp_path: Path, names: list[str]) -> Path:
    """A layout listing one image once per name, as `podman save --multi-image-archive` and
    repeated `skopeo copy ... oci-archive:` write it: same digest, one index entry per tag."""
    layout = tmp_path / "layout"
    digests = {write_oci_layout(layout, [layer(tmp_path, "a", b"a")], config("a"), name) for name in names}
    assert len(digests) == 1
    assert len(json.loads((layout / "index.json").read_text())["manifests"]) == len(names)
    return layout


def test_one_image_under_several_tags_imports_once_with_every_tag(tmp_path):
    names = ["example.com/a:1", "example.com/a:2", "example.com/b:latest"]
    layout = _multi_tag_layout(tmp_path, names)

    store = ImageStore(tmp_path / "store")
    [image] = import_oci_archive(store, archive_layout(layout, tmp_path / "l.tar"))

    assert sorted(image.repo_tags) == sorted(names)
    assert [i.id for i in store.list()] == [image.id]


def test_tag_names_an_image_listed_under_several_tags(tmp_path):
    layout = _multi_tag_layout(tmp_path, ["example.com/a:1", "example.com/a:2", "example.com/a:3"])

    store = ImageStore(tmp_path / "store")
    [image] = import_oci_archive(store, layout, tag="registry.k8s.io/pause:3.9")

    # --tag wins over the names in the layout, as with a single entry.
    assert image.repo_tags == ["registry.k8s.io/pause:3.9"]


def test_skopeo_bare_tag_names_import_untagged_once(tmp_path):
    # skopeo writes only the tag into ref.name: no repository to name the image by.
    layout = _multi_tag_layout(tmp_path, ["1", "2"])
    store = ImageStore(tmp_path / "store")
    [image] = import_oci_archive(store, layout)
    assert image.repo_tags == []
    [tagged] = import_oci_archive(store, layout, tag="example.com/t:1")
    assert tagged.id == image.id and tagged.repo_tags == ["example.com/t:1"]


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
