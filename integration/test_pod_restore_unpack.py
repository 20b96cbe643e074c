"""RestorePod unpacks the parts while it makes the sandbox (pyshim/checkpoint_restore/pod_unpack.py):
the containers still come back CREATED and run only at StartContainer, and nothing of the early
unpack is left when the pod goes before it started or the daemon is killed in the middle."""
from __future__ import annotations

import pytest

from cri_api import api_pb2 as cri
from integration.conftest import container_config, discard, new_settings
from integration.daemon import Daemon, leftovers, remove_everything
from integration.test_lifecycle import cleanup
from integration.test_pod_checkpoint import checkpoint_pod, new_pod, own_pid_namespace, restore_pod, run_pod
from pyshim.checkpoint_restore.pod_unpack import PREPARED_DIR, PREPARED_MARK

COUNTER = "i=0; while true; do echo $i > /tmp/counter; i=$((i+1)); sleep 0.1; done"


@pytest.fixture
def own_daemon(registry, busybox_ref):
    settings = new_settings("pu", "10.86.57.0/24")
    d = Daemon(settings)
    yield d
    d.start()
    with d.client() as c:
        remove_everything(c)
    d.stop()
    found = leftovers(settings) + discard(settings)
    assert not found, f"left behind: {found}"


def _checkpointed_pod(c, image, out):
    configs = [container_config(image, ["sh", "-c", COUNTER], name=f"c{i}", linux=own_pid_namespace())
               for i in range(2)]
    _, pod_id, ids = run_pod(c, configs)
    try:
        checkpoint_pod(c, pod_id, ids, out)
    finally:
        cleanup(c, pod_id)
    return configs


def _work_dirs(daemon) -> list:
    work = daemon.settings.root / "pod-unpack-work"
    return list(work.iterdir()) if work.is_dir() else []


def test_parts_unpacked_by_restorepod_are_used_at_start_and_removed_with_an_unstarted_pod(own_daemon, busybox_ref,
                                                                                          tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    own_daemon.start()
    with own_daemon.client() as c:
        c.pull(busybox_ref)
        configs = _checkpointed_pod(c, busybox_ref, out)
        bundles = []
        for attempt in range(2):
            response = restore_pod(c, out, new_pod(), configs)
            ids = [r.container_id for r in response.restored_containers]
            bundles = [own_daemon.settings.root / "containers" / cid for cid in ids]
            for cid, bundle in zip(ids, bundles):
                assert c.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status.state \
                    == cri.ContainerState.CONTAINER_CREATED
                assert (bundle / PREPARED_DIR / "inventory.img").is_file() and (bundle / PREPARED_MARK).is_file(), \
                    "RestorePod did not hand the unpacked part to its container"
            assert _work_dirs(own_daemon) == [], "RestorePod left its work directory"
            if attempt == 0:  # removed before any StartContainer: nothing of the unpack may stay
                cleanup(c, response.pod_sandbox_id)
                assert not any(b.exists() for b in bundles)
                continue
            c.start(ids[0])  # the first start restores both, from the trees RestorePod unpacked
            for cid, bundle in zip(ids, bundles):
                status = c.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
                assert status.state == cri.ContainerState.CONTAINER_RUNNING
                assert not (bundle / PREPARED_DIR).exists() and not (bundle / PREPARED_MARK).exists()
            c.start(ids[1])
            assert int(c.exec_sync(ids[1], ["cat", "/tmp/counter"]).stdout) > 0
            cleanup(c, response.pod_sandbox_id)


def test_a_daemon_killed_while_restorepod_unpacks_leaves_no_work_directory(own_daemon, busybox_ref, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    own_daemon.start()
    with own_daemon.client() as c:
        c.pull(busybox_ref)
        configs = _checkpointed_pod(c, busybox_ref, out)
    own_daemon.stop()
    own_daemon.start(crash_at="unpack_pod_parts:hand_over")  # every part unpacked, none handed over
    with own_daemon.client() as c, pytest.raises(Exception):
        restore_pod(c, out, new_pod(), configs)
    own_daemon.wait_crashed()
    work = _work_dirs(own_daemon)
    assert work and any((w / "0").is_dir() for w in work), "the crash point was not inside the unpack"
    own_daemon.start()
    assert _work_dirs(own_daemon) == [], "recovery left RestorePod's unpacked parts"
    intents = own_daemon.settings.root / "state" / "intents"
    assert not any("unpack_pod_parts" in p.read_text() for p in intents.glob("*.json"))
