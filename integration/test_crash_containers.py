"""Fault injection: the daemon SIGKILLs itself at each step of each container operation.

Each case starts the daemon with PYSHIM_CRASH_AT=<operation>:<step> (pyshim/internal/crashpoints.py),
makes the call (which fails UNAVAILABLE as the daemon dies), restarts it without a crash point, and
asserts that the CRI answers are truthful, that a retried call succeeds, that the workload runs exactly
once or not at all, and that nothing is left on the machine that no record owns.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as cri
from integration.conftest import container_config, discard, new_settings, pod_config
from integration.daemon import (Daemon, archive_temp_files, checkpoint_work_dirs, container_dirs_without_record,
                                frozen_cgroups, leftovers, remove_everything, unowned_container_cgroups)
from pyshim.annotations import CHECKPOINT_MODE_KEY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(registry, busybox_ref):
    settings = new_settings("crashctr", "10.87.1.0/24")
    daemon = Daemon(settings)
    try:
        daemon.start()
        with daemon.client() as c:
            c.pull(busybox_ref)
        yield daemon
    finally:
        daemon.stop()
        found = leftovers(settings)
        remaining_cgroups = discard(settings)
        assert not found and not remaining_cgroups, f"left behind: {found} {remaining_cgroups}"


@pytest.fixture
def crashy(node, busybox_ref, tmp_path):
    """The node's daemon, serving; after the test everything is removed and nothing may remain."""
    if node.process is None or node.process.poll() is not None:
        node.start()
    yield node
    if node.process.poll() is not None:
        node.start()
    with node.client() as c:
        remove_everything(c)
    assert not leftovers(node.settings), leftovers(node.settings)
    assert not unowned_container_cgroups(node.settings, set()), unowned_container_cgroups(node.settings, set())


def restart_with_crash_point(daemon: Daemon, point: str) -> None:
    daemon.stop()
    daemon.start(crash_at=point)


def crash_during(daemon: Daemon, call) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    daemon.wait_crashed()
    daemon.start()  # recovery runs before it serves


def nothing_unowned(daemon: Daemon, client, archive_dir: Path | None = None) -> None:
    listed = {c.id for c in client.runtime.ListContainers(cri.ListContainersRequest()).containers}
    found = (container_dirs_without_record(daemon.settings, listed) + frozen_cgroups(daemon.settings)
             + checkpoint_work_dirs(daemon.settings) + unowned_container_cgroups(daemon.settings, listed))
    if archive_dir is not None:
        found += archive_temp_files(archive_dir)
    runc_ids = {line.split()[-1] for line in leftovers(daemon.settings) if line.startswith("runc container")}
    found += [f"runc container {i} with no record" for i in runc_ids - listed]
    assert not found, found


def processes_with(marker: str) -> int:
    """Host processes whose command line holds `marker`: the workload, counted."""
    count = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    count += 1
            except OSError:
                pass
    return count


def workload(marker: str) -> list[str]:
    # The marker is in the shell's own command line (its sleep children do not carry it): one process each.
    return ["sh", "-c", f"M={marker}; i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.2; done"]


def state_of(client, cid):
    return client.status(cid).status.state


# ---- CreateContainer -----------------------------------------------------------------------------

@pytest.mark.parametrize("point", ["create_container:begin", "create_container:rootfs",
                                   "create_container:runc_create", "create_container:record"])
def test_create_container_killed_leaves_nothing_and_a_retry_creates_once(crashy, busybox_ref, point):
    marker = f"crash{uuid.uuid4().hex[:10]}"
    with crashy.client() as c:
        pod = pod_config()
        pod_id = c.run_pod(pod)
    restart_with_crash_point(crashy, point)
    config = container_config(busybox_ref, workload(marker))
    with crashy.client() as c:
        crash_during(crashy, lambda: c.create(pod_id, config, pod))
    with crashy.client() as c:
        assert list(c.runtime.ListContainers(cri.ListContainersRequest()).containers) == []
        assert processes_with(marker) == 0
        nothing_unowned(crashy, c)
        cid = c.create(pod_id, config, pod)  # the name was freed
        c.start(cid)
        assert state_of(c, cid) == cri.CONTAINER_RUNNING
        assert processes_with(marker) == 1
        nothing_unowned(crashy, c)


# ---- StartContainer ------------------------------------------------------------------------------

@pytest.mark.parametrize("point", ["start_container:begin", "start_container:record"])
def test_start_container_killed_is_reported_truthfully(crashy, busybox_ref, point):
    marker = f"crash{uuid.uuid4().hex[:10]}"
    with crashy.client() as c:
        pod = pod_config()
        pod_id = c.run_pod(pod)
        cid = c.create(pod_id, container_config(busybox_ref, workload(marker)), pod)
    restart_with_crash_point(crashy, point)
    with crashy.client() as c:
        crash_during(crashy, lambda: c.start(cid))
    with crashy.client() as c:
        if point == "start_container:begin":  # runc start never ran
            assert state_of(c, cid) == cri.CONTAINER_CREATED and processes_with(marker) == 0
            c.start(cid)
        status = c.status(cid).status
        assert status.state == cri.CONTAINER_RUNNING and status.started_at > 0
        assert status.started_at <= time.time_ns()
        assert processes_with(marker) == 1
        assert c.exec_sync(cid, ["cat", "/tmp/n"]).exit_code == 0
        nothing_unowned(crashy, c)


# ---- CheckpointContainer -------------------------------------------------------------------------

def _checkpoint(c, cid, location: Path, stop: bool = False) -> None:
    metadata = ((CHECKPOINT_MODE_KEY, "stop"),) if stop else ()
    c.runtime.CheckpointContainer(cri.CheckpointContainerRequest(container_id=cid, location=str(location),
                                                                 timeout=120), metadata=metadata, timeout=130)


@pytest.mark.parametrize("point,stop", [
    # A leave-running checkpoint is frozen by CRIU (no "freeze" step: runc pause is for stopping ones).
    ("checkpoint_container:prepare", False), ("checkpoint_container:freeze", True),
    ("checkpoint_container:dump", False), ("checkpoint_container:post_dump", False),
    ("checkpoint_container:archive", False),
    ("checkpoint_container:dump", True), ("checkpoint_container:archive", True),
    ("checkpoint_container:kill", True)])
def test_checkpoint_killed_leaves_the_container_running_thawed_and_no_debris(crashy, busybox_ref, tmp_path,
                                                                              point, stop):
    marker = f"crash{uuid.uuid4().hex[:10]}"
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir(mode=0o700)
    location = archive_dir / "ckpt.tar"
    with crashy.client() as c:
        pod = pod_config(log_directory=str(tmp_path / "logs"))
        pod_id = c.run_pod(pod)
        cid = c.create(pod_id, container_config(busybox_ref, workload(marker)), pod)
        c.start(cid)
    restart_with_crash_point(crashy, point)
    with crashy.client() as c:
        crash_during(crashy, lambda: _checkpoint(c, cid, location, stop))
    with crashy.client() as c:
        assert state_of(c, cid) == cri.CONTAINER_RUNNING
        assert c.exec_sync(cid, ["cat", "/tmp/n"], timeout=10).exit_code == 0, "still frozen"
        assert processes_with(marker) == 1
        # Only a stopping checkpoint killed after its archive was renamed into place keeps it.
        assert location.exists() == (point == "checkpoint_container:kill")
        nothing_unowned(crashy, c, archive_dir)
        # A kill while CRIU waited in pyshim's post-dump hook: the hook read EOF, CRIU failed the dump
        # and thawed the tasks; recovery took the action script out of the container's CRIU config.
        assert not (crashy.settings.root / "containers" / cid / "criu.conf").exists()
        location.unlink(missing_ok=True)
        _checkpoint(c, cid, location)  # the retry
        assert location.is_file() and state_of(c, cid) == cri.CONTAINER_RUNNING
        nothing_unowned(crashy, c, archive_dir)


def test_a_stopping_checkpoint_killed_after_its_kill_reports_the_container_checkpointed(crashy, busybox_ref,
                                                                                        tmp_path):
    """The daemon dies once the container is killed, before it records the checkpoint: after the
    restart the container must read as stopped by that checkpoint, not as a failure (exit 137)."""
    marker = f"crash{uuid.uuid4().hex[:10]}"
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir(mode=0o700)
    location = archive_dir / "ckpt.tar"
    with crashy.client() as c:
        pod = pod_config(log_directory=str(tmp_path / "logs"))
        pod_id = c.run_pod(pod)
        cid = c.create(pod_id, container_config(busybox_ref, workload(marker)), pod)
        c.start(cid)
    restart_with_crash_point(crashy, "checkpoint_container:stopped")
    with crashy.client() as c:
        crash_during(crashy, lambda: _checkpoint(c, cid, location, stop=True))
    with crashy.client() as c:
        status = c.status(cid, verbose=True)
        assert status.status.state == cri.CONTAINER_EXITED and processes_with(marker) == 0
        assert status.status.reason == "Checkpointed" and str(location) in status.status.message
        info = json.loads(status.info["info"])
        assert info["checkpointLocation"] == str(location) and info["lastCheckpoint"]["stopped"] is True
        assert location.is_file()
        nothing_unowned(crashy, c, archive_dir)


# ---- restore's StartContainer --------------------------------------------------------------------

@pytest.fixture(scope="module")
def counter_archive(node, busybox_ref, tmp_path_factory):
    marker = f"restored{uuid.uuid4().hex[:10]}"
    archive = tmp_path_factory.mktemp("crash-archives") / "counter.tar"
    if node.process is None or node.process.poll() is not None:
        node.start()
    with node.client() as c:
        pod = pod_config()
        pod_id = c.run_pod(pod)
        cid = c.create(pod_id, container_config(busybox_ref, workload(marker)), pod)
        c.start(cid)
        _checkpoint(c, cid, archive)
        c.stop_pod(pod_id)
        c.remove_pod(pod_id)
    return archive, marker


@pytest.mark.parametrize("point", ["restore_container:rootfs", "restore_container:unpack",
                                   "restore_container:runc_restore", "restore_container:record"])
def test_restore_start_killed_is_adopted_or_reset_and_runs_exactly_once(crashy, counter_archive, point):
    archive, marker = counter_archive
    with crashy.client() as c:
        pod = pod_config()
        pod_id = c.run_pod(pod)
        cid = c.create(pod_id, container_config(str(archive), [], name="restored"), pod)
    restart_with_crash_point(crashy, point)
    with crashy.client() as c:
        crash_during(crashy, lambda: c.start(cid))
    with crashy.client() as c:
        if point == "restore_container:record":  # conmon and the restored process were up: adopted
            assert state_of(c, cid) == cri.CONTAINER_RUNNING
        else:
            assert state_of(c, cid) == cri.CONTAINER_CREATED
            assert processes_with(marker) == 0
            nothing_unowned(crashy, c)
            c.start(cid)  # the retry restores cleanly
        assert state_of(c, cid) == cri.CONTAINER_RUNNING
        assert json.loads(c.status(cid, verbose=True).info["info"])["restored"] is True
        assert processes_with(marker) == 1
        assert c.exec_sync(cid, ["cat", "/tmp/n"], timeout=10).exit_code == 0
        nothing_unowned(crashy, c)
        c.stop_pod(pod_id)
        c.remove_pod(pod_id)


# ---- StopContainer / RemoveContainer -------------------------------------------------------------

@pytest.mark.parametrize("point", ["stop_container:kill", "remove_container:begin", "remove_container:delete",
                                   "remove_container:record"])
def test_stop_and_remove_killed_finish_on_retry(crashy, busybox_ref, point):
    marker = f"crash{uuid.uuid4().hex[:10]}"
    with crashy.client() as c:
        pod = pod_config()
        pod_id = c.run_pod(pod)
        cid = c.create(pod_id, container_config(busybox_ref, workload(marker)), pod)
        c.start(cid)
    restart_with_crash_point(crashy, point)
    with crashy.client() as c:
        crash_during(crashy, (lambda: c.stop(cid, timeout=0)) if point.startswith("stop") else
                     (lambda: c.remove(cid)))
    with crashy.client() as c:
        listed = {x.id for x in c.runtime.ListContainers(cri.ListContainersRequest()).containers}
        if point.startswith("remove"):
            assert cid not in listed, "an interrupted RemoveContainer is finished at recovery"
            assert processes_with(marker) == 0
        else:
            c.stop(cid, timeout=0)
            assert state_of(c, cid) == cri.CONTAINER_EXITED and processes_with(marker) == 0
        c.remove(cid)  # the retry succeeds either way
        nothing_unowned(crashy, c)
