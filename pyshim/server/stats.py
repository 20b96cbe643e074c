"""ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats (cgroup v1 readings)."""
from __future__ import annotations

import threading
import time

from cri_api import api_pb2 as cri
from pyshim.errors import NotFound
from pyshim.internal import cgroups
from pyshim.internal.state import ContainerState, SandboxState
from pyshim.server import convert
from pyshim.server.runtime import Runtime

_U64 = cri.UInt64Value


class _CpuRate:
    """usage_nano_cores needs two readings; remember the last one of each cgroup."""

    def __init__(self):
        self._last: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def nano_cores(self, key: str, usage: cgroups.Usage) -> int:
        with self._lock:
            previous = self._last.get(key)
            self._last[key] = (usage.timestamp_ns, usage.cpu_usage_ns)
        if previous is None or usage.timestamp_ns <= previous[0]:
            return 0
        return max(0, (usage.cpu_usage_ns - previous[1]) * 10**9 // (usage.timestamp_ns - previous[0]))


_rates = _CpuRate()


def _cpu(key: str, usage: cgroups.Usage | None, now: int):
    if usage is None:
        return cri.CpuUsage(timestamp=now)
    return cri.CpuUsage(timestamp=usage.timestamp_ns, usage_core_nano_seconds=_U64(value=usage.cpu_usage_ns),
                        usage_nano_cores=_U64(value=_rates.nano_cores(key, usage)))


def _memory(usage: cgroups.Usage | None, now: int):
    if usage is None:
        return cri.MemoryUsage(timestamp=now)
    return cri.MemoryUsage(
        timestamp=usage.timestamp_ns, working_set_bytes=_U64(value=usage.memory_working_set_bytes),
        usage_bytes=_U64(value=usage.memory_usage_bytes), rss_bytes=_U64(value=usage.memory_rss_bytes),
        page_faults=_U64(value=usage.page_faults), major_page_faults=_U64(value=usage.major_page_faults))


def _container_stats(rt: Runtime, record) -> "cri.ContainerStats":
    config = rt.containers.config_of(record)
    now = time.time_ns()
    usage = rt.containers.usage(record)
    used, inodes = rt.containers.writable_layer_usage(record)
    return cri.ContainerStats(
        attributes=cri.ContainerAttributes(id=record.id, metadata=config.metadata, labels=dict(config.labels),
                                           annotations=dict(config.annotations)),
        cpu=_cpu(record.id, usage, now), memory=_memory(usage, now),
        writable_layer=cri.FilesystemUsage(timestamp=now, fs_id=cri.FilesystemIdentifier(mountpoint=str(record.upper)),
                                           used_bytes=_U64(value=used), inodes_used=_U64(value=inodes)),
    )


def container_stats(rt: Runtime, request) -> "cri.ContainerStatsResponse":
    return cri.ContainerStatsResponse(stats=_container_stats(rt, rt.containers.get(request.container_id)))


def list_container_stats(rt: Runtime, request) -> "cri.ListContainerStatsResponse":
    f = request.filter if request.HasField("filter") else None
    stats = []
    for record in rt.containers.all():
        # Like other runtimes: stats are for running containers only.
        if record.state != ContainerState.RUNNING:
            continue
        if f is not None:
            if f.id and not record.id.startswith(f.id):
                continue
            if f.pod_sandbox_id and not record.sandbox_id.startswith(f.pod_sandbox_id):
                continue
            if not convert.labels_match(f.label_selector, rt.containers.config_of(record).labels):
                continue
        stats.append(_container_stats(rt, record))
    return cri.ListContainerStatsResponse(stats=stats)


def _pod_stats(rt: Runtime, record) -> "cri.PodSandboxStats":
    config = rt.sandboxes.config_of(record)
    now = time.time_ns()
    usage = cgroups.usage(record.cgroup_parent)
    containers = [_container_stats(rt, c) for c in rt.containers.in_sandbox(record.id)
                  if c.state == ContainerState.RUNNING]
    return cri.PodSandboxStats(
        attributes=cri.PodSandboxAttributes(id=record.id, metadata=config.metadata, labels=dict(config.labels),
                                            annotations=dict(config.annotations)),
        linux=cri.LinuxPodSandboxStats(
            cpu=_cpu("pod:" + record.id, usage, now), memory=_memory(usage, now),
            process=cri.ProcessUsage(timestamp=now, process_count=_U64(value=usage.pids if usage else 0)),
            containers=containers),
    )


def pod_sandbox_stats(rt: Runtime, request) -> "cri.PodSandboxStatsResponse":
    record = rt.sandboxes.find(request.pod_sandbox_id)
    if record is None:
        raise NotFound(f"pod sandbox {request.pod_sandbox_id!r} not found")
    return cri.PodSandboxStatsResponse(stats=_pod_stats(rt, record))


def list_pod_sandbox_stats(rt: Runtime, request) -> "cri.ListPodSandboxStatsResponse":
    f = request.filter if request.HasField("filter") else None
    stats = []
    for record in rt.sandboxes.all():
        if record.state != SandboxState.READY:
            continue
        if f is not None:
            if f.id and not record.id.startswith(f.id):
                continue
            if not convert.labels_match(f.label_selector, rt.sandboxes.config_of(record).labels):
                continue
        stats.append(_pod_stats(rt, record))
    return cri.ListPodSandboxStatsResponse(stats=stats)
