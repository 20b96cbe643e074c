"""Lazy (post-copy) restore: the process runs before its memory arrives; CRIU's lazy-pages daemon,
started and watched by pyshim, brings the pages. Real runc, CRIU and userfaultfd."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as cri
from criu_glue import lazy_pages
from integration.test_checkpoint import checkpoint
from integration.test_lifecycle import cleanup, run_container
from integration.test_restore import archive_dir, log_texts, restore_into_new_pod  # noqa: F401 (fixture)
from pyshim.annotations import RESTORE_LAZY_ANNOTATION

LAZY = {RESTORE_LAZY_ANNOTATION: "true"}

# 8 MB of random text in the shell's own (anonymous) memory, its checksum at start, then a counter
# that prints the checksum again every 10 ticks: a page that came back wrong changes the sum.
MEMORY_COUNTER = (
    'big=$(head -c 6000000 /dev/urandom | base64 | tr -d "\\n"); echo "sum0 $(echo "$big" | md5sum)"; '
    'i=0; while true; do i=$((i+1)); echo "tick $i"; '
    'if [ $((i % 10)) = 0 ]; then echo "sum $(echo "$big" | md5sum)"; fi; sleep 0.1; done')
# Memory in a `sort` that holds what it read (bench/restore.py's holder): enough pages that the
# background copy is still under way when StartContainer returns.
HOLDER = "(yes $(head -c 1023 /dev/zero | tr '\\000' a) | head -c {size}; sleep 100000) | sort"


def _lazy_info(client, cid) -> dict:
    info = json.loads(client.status(cid, verbose=True).info["info"])
    return {k: v for k, v in info.items() if k.startswith("lazyPages")}


def _wait_lazy_state(client, cid, wanted: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = _lazy_info(client, cid)
        if info.get("lazyPages") in wanted:
            return info
        assert time.monotonic() < deadline, f"lazy pages never reached {wanted}: {info}"
        time.sleep(0.1)


def _daemons_of(daemon) -> dict[int, Path]:
    return lazy_pages.find_daemons(daemon.settings.root / "containers")


def _bundle(daemon, cid) -> Path:
    return daemon.settings.root / "containers" / cid


def _wait_log(client, cid, prefix: str, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        texts = log_texts(client, cid)
        if any(t.startswith(prefix) for t in texts):
            return texts
        assert time.monotonic() < deadline, f"no {prefix!r} in the log: {texts[-5:]}"
        time.sleep(0.1)


def _checkpointed(client, image, archive: Path, script: str, ready: str) -> None:
    pod, pod_id, cid = run_container(client, image, ["sh", "-c", script])
    try:
        _wait_log(client, cid, ready)
        checkpoint(client, cid, archive)
    finally:
        cleanup(client, pod_id)


def _holder_checkpoint(client, image, archive: Path, size_mib: int) -> None:
    pod, pod_id, cid = run_container(client, image, ["sh", "-c", HOLDER.format(size=size_mib << 20)])
    try:
        deadline = time.monotonic() + 60
        # `head` ends once the holder has read everything: then `sort` holds it all.
        while "head" in client.exec_sync(cid, ["ps", "-o", "comm"]).stdout.decode().split():
            assert time.monotonic() < deadline, "the memory holder never filled up"
            time.sleep(0.2)
        checkpoint(client, cid, archive)
    finally:
        cleanup(client, pod_id)


@pytest.fixture(scope="module")
def holder_archive(daemon, pulled_busybox, tmp_path_factory) -> Path:
    """A checkpoint of 256 MiB held in memory, taken once: enough pages that the background copy is
    still under way when StartContainer returns and the test stops the daemon (SIGSTOP)."""
    archive = tmp_path_factory.mktemp("lazy-holder") / "holder.tar"
    with daemon.client() as client:
        _holder_checkpoint(client, pulled_busybox, archive, 256)
    return archive


def _stopped_mid_transfer(client, daemon, cid) -> int:
    """SIGSTOP the container's lazy-pages daemon while it still transfers; its pid."""
    daemons = _daemons_of(daemon)
    assert list(daemons.values()) == [_bundle(daemon, cid)], daemons
    pid = next(iter(daemons))
    os.kill(pid, signal.SIGSTOP)
    assert _lazy_info(client, cid)["lazyPages"] == "transferring"
    return pid


def test_lazy_restore_keeps_memory_intact_and_leaves_nothing(client, daemon, pulled_busybox, archive_dir):
    archive = archive_dir / "memory.tar"
    _checkpointed(client, pulled_busybox, archive, MEMORY_COUNTER, "sum ")
    pod, pod_id, cid = restore_into_new_pod(client, str(archive), annotations=LAZY)
    try:
        texts_before = log_texts(client, cid)
        sum0 = next(t for t in texts_before if t.startswith("sum0 ")).split(" ", 1)[1]
        done = _wait_lazy_state(client, cid, {"complete"})
        assert done["lazyPagesTotalBytes"] >= 6_000_000, done  # the string came lazily
        # Not always every byte: a `sleep` child that ends before its pages came needs none of them.
        assert done["lazyPagesCopiedBytes"] >= 6_000_000, done
        assert done["lazyPagesSource"] == "local images"
        # After every page arrived the process goes on with its memory as it was: the counter
        # continues (never restarts) and the checksum printed since the restore is the original one.
        time.sleep(2.5)  # the loop prints its checksum every 10 ticks
        texts = log_texts(client, cid)
        new_sums = [t for t in texts[len(texts_before):] if t.startswith("sum ")]
        assert new_sums, texts[-5:]
        assert all(t.split(" ", 1)[1] == sum0 for t in new_sums), (sum0, new_sums)
        assert texts.count("tick 1\n") == 1
        assert client.status(cid).status.state == cri.CONTAINER_RUNNING
        # The transfer left nothing: no daemon, no socket, no page images.
        bundle = _bundle(daemon, cid)
        assert not _daemons_of(daemon)
        assert not (bundle / lazy_pages.SOCKET_NAME).exists()
        assert not (bundle / "checkpoint").exists()
    finally:
        cleanup(client, pod_id)
    assert not _daemons_of(daemon)


def test_remove_mid_transfer_ends_the_daemon_and_leaves_nothing(client, daemon, holder_archive):
    pod, pod_id, cid = restore_into_new_pod(client, str(holder_archive), annotations=LAZY)
    try:
        _stopped_mid_transfer(client, daemon, cid)
        client.remove(cid)
        assert not _daemons_of(daemon)
        assert not _bundle(daemon, cid).exists()
    finally:
        cleanup(client, pod_id)


def test_checkpoint_while_pages_arrive_is_refused(client, daemon, holder_archive, archive_dir):
    pod, pod_id, cid = restore_into_new_pod(client, str(holder_archive), annotations=LAZY)
    try:
        pid = _stopped_mid_transfer(client, daemon, cid)
        with pytest.raises(grpc.RpcError) as err:
            checkpoint(client, cid, archive_dir / "again.tar")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "lazyPages" in err.value.details()
        assert not (archive_dir / "again.tar").exists()
        os.kill(pid, signal.SIGCONT)
        _wait_lazy_state(client, cid, {"complete"})
        checkpoint(client, cid, archive_dir / "again.tar")  # once every page is in place it works
        assert (archive_dir / "again.tar").stat().st_size > 256 << 20
    finally:
        cleanup(client, pod_id)


def test_a_dead_page_source_kills_the_process_with_a_reason(client, daemon, holder_archive):
    pod, pod_id, cid = restore_into_new_pod(client, str(holder_archive), annotations=LAZY)
    try:
        pid = _stopped_mid_transfer(client, daemon, cid)
        os.kill(pid, signal.SIGKILL)
        info = _wait_lazy_state(client, cid, {"failed", "complete", "ended"}, timeout=30)
        assert info["lazyPages"] == "failed", info
        status = client.status(cid).status
        assert status.state == cri.CONTAINER_EXITED
        assert status.reason == "LazyPagesFailed"
        assert "lazy-pages daemon" in status.message and "was killed" in status.message
        assert not (_bundle(daemon, cid) / lazy_pages.SOCKET_NAME).exists()
    finally:
        cleanup(client, pod_id)


def test_bad_lazy_annotations_are_refused_at_create(client, pulled_busybox, archive_dir):
    archive = archive_dir / "memory.tar"
    _checkpointed(client, pulled_busybox, archive, "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done",
                  "tick 2")
    with pytest.raises(grpc.RpcError) as err:
        restore_into_new_pod(client, str(archive), annotations={RESTORE_LAZY_ANNOTATION: "yes"})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert RESTORE_LAZY_ANNOTATION in err.value.details()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_pyshim_adopts_a_transfer_still_running(daemon, holder_archive):
    """The daemon runs in its own session: a SIGKILLed pyshim does not take the page source with it,
    and the next pyshim watches it to the end."""
    with daemon.client() as client:
        pod, pod_id, cid = restore_into_new_pod(client, str(holder_archive), annotations=LAZY)
        pid = _stopped_mid_transfer(client, daemon, cid)
    try:
        daemon.kill()
        assert _alive(pid), "the lazy-pages daemon died with pyshim"
        daemon.start()
        with daemon.client() as client:
            assert _lazy_info(client, cid)["lazyPages"] == "transferring"
            os.kill(pid, signal.SIGCONT)
            _wait_lazy_state(client, cid, {"complete"})
            assert client.status(cid).status.state == cri.CONTAINER_RUNNING
            assert not _daemons_of(daemon)
            assert not (_bundle(daemon, cid) / lazy_pages.SOCKET_NAME).exists()
    finally:
        with daemon.client() as client:
            cleanup(client, pod_id)


def test_page_source_dead_while_pyshim_was_down_kills_the_process(daemon, holder_archive):
    with daemon.client() as client:
        pod, pod_id, cid = restore_into_new_pod(client, str(holder_archive), annotations=LAZY)
        pid = _stopped_mid_transfer(client, daemon, cid)
    try:
        daemon.kill()
        os.kill(pid, signal.SIGKILL)
        daemon.start()
        with daemon.client() as client:
            status = client.status(cid).status
            assert status.state == cri.CONTAINER_EXITED and status.reason == "LazyPagesFailed", status
            assert _lazy_info(client, cid)["lazyPages"] == "failed"
    finally:
        with daemon.client() as client:
            cleanup(client, pod_id)
