"""Restoring archives other engines wrote: real Podman 5 archives (plain, gzip, zstd)."""
from __future__ import annotations

import time

import pytest

from cri_api import api_pb2 as cri
from integration import podman as pm
from integration.test_checkpoint import counter_value
from integration.test_lifecycle import cleanup
from integration.test_podman_archives import busybox, podman, produced  # noqa: F401 (fixtures)
from integration.test_restore import log_texts, restore_into_new_pod


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
