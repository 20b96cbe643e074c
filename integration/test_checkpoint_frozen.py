"""CheckpointContainer frozen by CRIU itself (post_dump_hook.py): the container is not paused before
runc and CRIU start, its writable-layer diff is taken while CRIU holds it frozen, and the archive's
files are of the same instant as its memory."""
from __future__ import annotations

import json
import time
from pathlib import Path

from cri_api import api_pb2 as cri
from integration.test_checkpoint import assert_running_and_thawed, checkpoint, counter_value
from integration.test_lifecycle import cleanup, run_container
from integration.test_restore import restore_into_new_pod
from pyshim.checkpoint_restore.post_dump_hook import CRIU_CONFIG_ANNOTATION

# Appends its in-memory counter to a file of its writable layer, then increments it: in a
# consistent checkpoint the file ends with the number before the one the memory holds, and the
# restored process, going on from its memory, appends exactly the next one. A diff taken after the
# memory would repeat numbers, one taken before would skip some.
SEQUENCE = "i=1; while true; do echo $i >> /tmp/seq; i=$((i+1)); echo $i > /tmp/counter; sleep 0.01; done"


def checkpoint_log_entries(daemon, cid: str) -> list[dict]:
    entries = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        if '"container checkpointed"' in line and cid in line:
            entries.append(json.loads(line))
    return entries


def sequence_in(client, cid) -> list[int]:
    return [int(n) for n in client.exec_sync(cid, ["cat", "/tmp/seq"]).stdout.split()]


def test_checkpoint_is_frozen_by_criu_and_its_files_are_of_the_memorys_instant(client, daemon, pulled_busybox,
                                                                               tmp_path):
    archive_dir = tmp_path / "checkpoints"
    archive_dir.mkdir(mode=0o700)
    archive = archive_dir / "seq.tar"
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", SEQUENCE])
    try:
        bundle = daemon.settings.root / "containers" / cid
        spec = json.loads((bundle / "config.json").read_text())
        assert spec["annotations"][CRIU_CONFIG_ANNOTATION] == str(bundle / "criu.conf")
        time.sleep(0.5)
        checkpoint(client, cid, archive)
        [entry] = checkpoint_log_entries(daemon, cid)
        assert entry["frozen_by"] == "criu", entry
        assert "pause" not in entry["phases_ms"] and entry["phases_ms"]["post_dump_wait"] > 0
        assert not (bundle / "criu.conf").exists(), "the action script must not outlive the checkpoint"
        assert_running_and_thawed(client, daemon, cid)
    finally:
        cleanup(client, pod_id)

    pod, pod_id, restored = restore_into_new_pod(client, str(archive))
    try:
        deadline = time.monotonic() + 10
        while len(seq := sequence_in(client, restored)) < 3 or counter_value(client, restored) <= seq[-1]:
            assert time.monotonic() < deadline, "the restored counter does not go on"
            time.sleep(0.05)
        assert seq == list(range(1, len(seq) + 1)), \
            f"the checkpoint's files and memory are not of one instant: {_gaps(seq)}"
    finally:
        cleanup(client, pod_id)


def _gaps(seq: list[int]) -> str:
    odd = [(a, b) for a, b in zip(seq, seq[1:]) if b != a + 1]
    return f"{len(seq)} numbers, breaks at {odd[:5]}"


def test_a_second_checkpoint_of_a_restored_container_keeps_its_criu_options(client, daemon, pulled_busybox, tmp_path):
    """A restored container's criu.conf (tcp-close, written at restore) is the same file: a checkpoint
    adds its action script for the dump only and puts the file back as it was."""
    archive_dir = tmp_path / "checkpoints"
    archive_dir.mkdir(mode=0o700)
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", SEQUENCE])
    try:
        time.sleep(0.3)
        checkpoint(client, cid, archive_dir / "first.tar")
    finally:
        cleanup(client, pod_id)
    pod, pod_id, restored = restore_into_new_pod(client, str(archive_dir / "first.tar"))
    try:
        config = daemon.settings.root / "containers" / restored / "criu.conf"
        config.write_text("tcp-close\n")  # as a restore into a new address writes it
        checkpoint(client, restored, archive_dir / "second.tar")
        assert config.read_text() == "tcp-close\n"
        assert checkpoint_log_entries(daemon, restored)[-1]["frozen_by"] == "criu"
        assert client.status(restored).status.state == cri.CONTAINER_RUNNING
    finally:
        cleanup(client, pod_id)
