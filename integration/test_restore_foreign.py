"""Restoring archives other engines wrote: real Podman 5 archives (plain, gzip, zstd), and CRI-O's
and containerd's layouts."""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from cri_api import api_pb2 as cri
from integration import podman as pm
from integration.test_checkpoint import COUNTER, counter_value
from integration.test_lifecycle import cleanup
from integration.test_podman_archives import busybox, podman, produced  # noqa: F401 (fixtures)
from integration.test_restore import checkpointed_counter, log_texts, repack, restore_into_new_pod


@pytest.mark.parametrize("compress", pm.COMPRESSIONS)
def test_restore_a_podman_archive_into_a_new_pod(client, pulled_busybox, produced, compress):  # noqa: F811
    archive = produced[compress]
    _, pod_id, cid = restore_into_new_pod(client, str(archive.path))
    try:
        assert client.status(cid).status.state == cri.CONTAINER_RUNNING
        first = counter_value(client, cid)
        assert first >= archive.last_tick
        time.sleep(0.5)
        assert counter_value(client, cid) > first
        assert client.exec_sync(cid, ["test", "-e", pm.ADDED_FILE]).exit_code == 0
        assert client.exec_sync(cid, ["test", "-e", pm.DELETED_FILE]).exit_code == 1
        assert any(f"tick {archive.last_tick}" in t for t in log_texts(client, cid)), "Podman's log lines were lost"
    finally:
        cleanup(client, pod_id)


# CRI-O's and containerd's layouts, made from a real checkpoint by renaming and re-encoding its
# members as those engines write them (neither engine runs on this machine).

def _member_bytes(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        return tar.extractfile(name).read()


def _as_crio(archive: Path, out: Path) -> Path:
    spec = json.loads(_member_bytes(archive, "spec.dump"))
    spec["annotations"].update({"io.container.manager": "cri-o", "io.kubernetes.cri-o.Metadata":
                                json.dumps({"name": "main", "attempt": 0})})
    return repack(archive, out, {"spec.dump": json.dumps(spec).encode(),
                                 "io.kubernetes.cri-o.LogPath": _member_bytes(archive, "container.log")},
                  drop=("container.log", "status.dump"))


def _as_containerd(archive: Path, out: Path) -> Path:
    """containerd: rootfs-diff.tar is gzip with OCI whiteouts, and there is no deleted.files."""
    deleted = json.loads(_member_bytes(archive, "deleted.files"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(_member_bytes(archive, "rootfs-diff.tar"))) as src, \
            tarfile.open(fileobj=buf, mode="w:gz") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
        for path in deleted:
            parent, base = os.path.split(path.strip("/"))
            dst.addfile(tarfile.TarInfo(os.path.join(parent, f".wh.{base}")))
    return repack(archive, out, {"rootfs-diff.tar": buf.getvalue()}, drop=("deleted.files",))


@pytest.mark.parametrize("layout", ["crio", "containerd"])
def test_restore_crio_and_containerd_layouts(client, pulled_busybox, tmp_path, layout):
    archive = tmp_path / "pyshim.tar"
    at_checkpoint = checkpointed_counter(client, pulled_busybox, archive,
                                         f"echo added > /added-file; rm /etc/group; {COUNTER}")
    foreign = (_as_crio if layout == "crio" else _as_containerd)(archive, tmp_path / f"{layout}.tar")
    _, pod_id, cid = restore_into_new_pod(client, str(foreign))
    try:
        assert counter_value(client, cid) >= at_checkpoint
        assert client.exec_sync(cid, ["cat", "/added-file"]).stdout == b"added\n"
        assert client.exec_sync(cid, ["test", "-e", "/etc/group"]).exit_code == 1
        assert "tick 0\n" in log_texts(client, cid), "the log copy was not carried over"
    finally:
        cleanup(client, pod_id)
