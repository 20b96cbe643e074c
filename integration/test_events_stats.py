"""GetContainerEvents, stats from cgroups, UpdateContainerResources, ReopenContainerLog."""
from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

from cri_api import api_pb2 as cri
from integration.conftest import container_config, pod_config
from integration.test_lifecycle import cleanup, run_container
from pyshim.internal.cri_log import read_log


def test_events_stream_reports_the_lifecycle(client, pulled_busybox):
    received: queue.Queue = queue.Queue()
    stream = client.runtime.GetContainerEvents(cri.GetEventsRequest())

    def consume():
        try:
            for event in stream:
                received.put((event.container_id, event.container_event_type))
        except Exception:  # noqa: BLE001 - the stream is cancelled at the end
            pass

    threading.Thread(target=consume, daemon=True).start()
    time.sleep(0.3)
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sleep", "300"])
    client.stop(cid, timeout=0)
    client.remove(cid)
    cleanup(client, pod_id)
    expected = [cri.CONTAINER_CREATED_EVENT, cri.CONTAINER_STARTED_EVENT, cri.CONTAINER_STOPPED_EVENT,
                cri.CONTAINER_DELETED_EVENT]
    seen = []
    deadline = time.monotonic() + 10
    while len(seen) < len(expected) and time.monotonic() < deadline:
        try:
            container_id, kind = received.get(timeout=0.5)
        except queue.Empty:
            continue
        if container_id == cid:
            seen.append(kind)
    stream.cancel()
    assert seen == expected


def test_stats_come_from_the_container_cgroup(client, pulled_busybox):
    # Touch ~20 MiB of memory and keep it.
    pod, pod_id, cid = run_container(client, pulled_busybox,
                                     ["sh", "-c", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=20; sleep 300"])
    try:
        time.sleep(1.5)
        stats = client.runtime.ContainerStats(cri.ContainerStatsRequest(container_id=cid)).stats
        assert stats.attributes.id == cid
        assert stats.memory.working_set_bytes.value > 15 * 2**20
        assert stats.cpu.usage_core_nano_seconds.value > 0
        listed = client.runtime.ListContainerStats(cri.ListContainerStatsRequest()).stats
        assert cid in [s.attributes.id for s in listed]
        pod_stats = client.runtime.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=pod_id)).stats
        assert pod_stats.linux.memory.working_set_bytes.value >= stats.memory.working_set_bytes.value
        assert [c.attributes.id for c in pod_stats.linux.containers] == [cid]
    finally:
        cleanup(client, pod_id)


def test_update_resources_reaches_the_cgroup(client, daemon, pulled_busybox):
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sleep", "300"])
    try:
        client.runtime.UpdateContainerResources(cri.UpdateContainerResourcesRequest(
            container_id=cid, linux=cri.LinuxContainerResources(memory_limit_in_bytes=64 * 2**20, cpu_shares=512)))
        rel = f"{daemon.settings.cgroup_parent}/{pod_id}/{cid}".lstrip("/")
        assert int(Path(f"/sys/fs/cgroup/memory/{rel}/memory.limit_in_bytes").read_text()) == 64 * 2**20
        assert int(Path(f"/sys/fs/cgroup/cpu/{rel}/cpu.shares").read_text()) == 512
    finally:
        cleanup(client, pod_id)


def test_reopen_log_after_rotation(client, pulled_busybox):
    pod, pod_id, cid = run_container(client, pulled_busybox,
                                     ["sh", "-c", "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.1; done"])
    try:
        log_path = Path(client.status(cid).status.log_path)
        time.sleep(0.5)
        os.rename(log_path, log_path.with_suffix(".log.1"))
        client.runtime.ReopenContainerLog(cri.ReopenContainerLogRequest(container_id=cid))
        # At once: kubelet and critest look for the new file as soon as the call returns.
        assert log_path.exists()
        deadline = time.monotonic() + 10
        while not list(read_log(log_path)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [e.text for e in read_log(log_path)], "no lines in the reopened log"
    finally:
        cleanup(client, pod_id)
