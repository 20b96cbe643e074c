import json

import pytest

from criu_glue import pod_checkpoint as podfmt
from criu_glue.errors import ArchiveFormatError


def manifest(**overrides) -> podfmt.PodManifest:
    fields = dict(
        pod_id="p" * 64, pod_config={"metadata": {"name": "web"}}, pod_ips=("10.88.0.5",), tcp="auto",
        containers=(
            podfmt.PodContainer(0, "server", "a" * 64, {"metadata": {"name": "server"}},
                                (podfmt.TcpConnection("127.0.0.1", 8080, "127.0.0.1", 40000),)),
            podfmt.PodContainer(1, "client", "b" * 64, {"metadata": {"name": "client"}},
                                (podfmt.TcpConnection("127.0.0.1", 40000, "127.0.0.1", 8080),
                                 podfmt.TcpConnection("10.88.0.5", 5000, "1.2.3.4", 443))),
        ),
        checkpointed_time_ns=1_700_000_000_123_456_789)
    fields.update(overrides)
    return podfmt.PodManifest(**fields)


def write_checkpoint(directory, m=None):
    m = m or manifest()
    (directory / podfmt.PARTS_DIR).mkdir()
    for c in m.containers:
        (directory / c.part).write_bytes(b"tar")
    podfmt.write_manifest(directory, m)
    return m


def test_round_trip(tmp_path):
    m = write_checkpoint(tmp_path)
    back = podfmt.read_manifest(tmp_path)
    assert back == m
    assert back.container("client").part == "containers/1.tar"
    assert back.container("server").loopback_tcp_only
    assert not back.container("client").loopback_tcp_only
    doc = json.loads((tmp_path / podfmt.MANIFEST).read_text())
    assert doc["format"] == "pyshim-pod-checkpoint" and doc["version"] == 1
    assert doc["checkpointed_at"].startswith("2023-11-14T22:13:20.123456789")
    assert oct((tmp_path / podfmt.MANIFEST).stat().st_mode & 0o777) == "0o600"
    assert podfmt.is_pod_checkpoint(tmp_path)


def _rewrite(tmp_path, mutate):
    write_checkpoint(tmp_path)
    doc = json.loads((tmp_path / podfmt.MANIFEST).read_text())
    mutate(doc)
    (tmp_path / podfmt.MANIFEST).write_text(json.dumps(doc))


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.update(format="other"), "not a pyshim-pod-checkpoint"),
    (lambda d: d.update(containers=[]), "non-empty"),
    (lambda d: d["containers"][1].update(name="server"), "not unique"),
    (lambda d: d["containers"][1].update(index=0), "index"),
    (lambda d: d["containers"][0].update(name=""), "name"),
    (lambda d: d.update(tcp="sometimes"), "tcp"),
    (lambda d: d["containers"][0].update(tcp_connections=[{"local": "x"}]), "malformed"),
    (lambda d: d.update(checkpointed_time_ns="soon"), "checkpointed_time_ns"),
    (lambda d: d["pod"].update(config=[]), "pod"),
])
def test_malformed_manifests_are_refused(tmp_path, mutate, message):
    _rewrite(tmp_path, mutate)
    with pytest.raises(ArchiveFormatError, match=message):
        podfmt.read_manifest(tmp_path)


def test_part_names_come_from_the_index_never_the_manifest(tmp_path):
    _rewrite(tmp_path, lambda d: d["containers"][0].update(part="../../etc/shadow", archive="/etc/shadow"))
    m = podfmt.read_manifest(tmp_path)
    assert m.containers[0].part == "containers/0.tar"


def test_missing_or_symlinked_parts_are_refused(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "containers/1.tar").unlink()
    with pytest.raises(ArchiveFormatError, match="missing"):
        podfmt.read_manifest(tmp_path)
    (tmp_path / "containers/1.tar").symlink_to("/etc/passwd")
    with pytest.raises(ArchiveFormatError, match="regular file"):
        podfmt.read_manifest(tmp_path)


def test_manifest_symlink_and_size_are_refused(tmp_path):
    write_checkpoint(tmp_path)
    real = tmp_path / "real.json"
    (tmp_path / podfmt.MANIFEST).rename(real)
    (tmp_path / podfmt.MANIFEST).symlink_to(real)
    with pytest.raises(ArchiveFormatError, match="cannot open"):
        podfmt.read_manifest(tmp_path)
    (tmp_path / podfmt.MANIFEST).unlink()
    (tmp_path / podfmt.MANIFEST).write_bytes(b" " * (podfmt.MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ArchiveFormatError, match="larger"):
        podfmt.read_manifest(tmp_path)


def test_no_manifest_is_not_a_pod_checkpoint(tmp_path):
    assert not podfmt.is_pod_checkpoint(tmp_path)
    with pytest.raises(ArchiveFormatError, match="not a pod checkpoint"):
        podfmt.read_manifest(tmp_path)


def test_loopback_detection():
    assert podfmt.TcpConnection("127.0.0.1", 1, "127.0.0.2", 2).loopback
    assert podfmt.TcpConnection("::1", 1, "::1", 2).loopback
    assert not podfmt.TcpConnection("127.0.0.1", 1, "10.0.0.1", 2).loopback
