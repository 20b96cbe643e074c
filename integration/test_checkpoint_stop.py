"""The two daemon-side pieces moves are built on: a checkpoint that stops the container (gRPC metadata
`pyshim-checkpoint-mode: stop`) and pods asking for a fixed address (io.pyshim.network.ip/mac)."""
from __future__ import annotations

import json
import time

import grpc
import pytest

from cri_api import api_pb2 as cri
from integration.conftest import container_config, pod_config
from integration.test_checkpoint import COUNTER, counter_value
from integration.test_lifecycle import cleanup, run_container
from integration.test_restore import log_texts, restore_into_new_pod
from pyshim.annotations import POD_IP_ANNOTATION, POD_MAC_ANNOTATION
from pyshim.migration.workload import checkpoint_and_stop


def ticks(texts: list[str]) -> list[int]:
    return [int(t.split()[1]) for t in texts if t.startswith("tick ")]


def test_checkpoint_with_stop_ends_the_container_at_its_image(client, pulled_busybox, tmp_path):
    archive = tmp_path / "stopped.tar"
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", COUNTER])
    try:
        time.sleep(1)
        figures = checkpoint_and_stop(client, cid, str(archive), timeout=120)
        assert figures["stopped"] is True and figures["archiveBytes"] == archive.stat().st_size
        assert {"pause", "dump", "diff", "archive", "kill"} <= set(figures["phasesMs"])
        status = client.status(cid).status
        assert status.state == cri.CONTAINER_EXITED
        assert status.reason == "Checkpointed" and str(archive) in status.message
        last_before = ticks(log_texts(client, cid))[-1]
    finally:
        cleanup(client, pod_id)

    # Nothing ran between the image and the kill: the restored counter's next tick is the next number.
    pod2, pod2_id, cid2 = restore_into_new_pod(client, str(archive))
    try:
        time.sleep(0.6)
        after = ticks(log_texts(client, cid2))
        assert after[:last_before + 1] == list(range(last_before + 1)), "lines before the checkpoint changed"
        assert after[last_before + 1:last_before + 3] == [last_before + 1, last_before + 2], \
            f"the restored counter skipped or repeated: {after[last_before - 2:last_before + 4]}"
        assert counter_value(client, cid2) > last_before
    finally:
        cleanup(client, pod2_id)


def test_checkpoint_mode_is_validated_and_default_keeps_running(client, pulled_busybox, tmp_path):
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sleep", "600"])
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.runtime.CheckpointContainer(
                cri.CheckpointContainerRequest(container_id=cid, location=str(tmp_path / "x.tar")),
                metadata=(("pyshim-checkpoint-mode", "pause"),), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pyshim-checkpoint-mode" in err.value.details()
        assert not (tmp_path / "x.tar").exists()
        client.runtime.CheckpointContainer(
            cri.CheckpointContainerRequest(container_id=cid, location=str(tmp_path / "y.tar")), timeout=60)
        status = client.status(cid, verbose=True)
        assert status.status.state == cri.CONTAINER_RUNNING
        assert json.loads(status.info["info"])["lastCheckpoint"]["stopped"] is False
    finally:
        cleanup(client, pod_id)


def test_pod_gets_the_address_it_asks_for(client, daemon):
    subnet_base = daemon.settings.subnet.split("/")[0].rsplit(".", 1)[0]
    wanted_ip, wanted_mac = f"{subnet_base}.77", "0a:58:0a:56:00:4d"
    pod = pod_config(annotations={POD_IP_ANNOTATION: wanted_ip, POD_MAC_ANNOTATION: wanted_mac})
    pod_id = client.run_pod(pod)
    try:
        status = client.pod_status(pod_id, verbose=True)
        assert status.status.network.ip == wanted_ip
        assert json.loads(status.info["info"])["network"]["mac"] == wanted_mac
        # The verbose info carries the config, so tools can recreate the pod.
        assert json.loads(status.info["info"])["config"]["metadata"]["name"] == pod.metadata.name
        # A second pod cannot have the same address while the first holds it.
        with pytest.raises(grpc.RpcError):
            client.run_pod(pod_config(annotations={POD_IP_ANNOTATION: wanted_ip}))
    finally:
        cleanup(client, pod_id)
    # Released with the pod: it can be had again.
    again = client.run_pod(pod_config(annotations={POD_IP_ANNOTATION: wanted_ip}))
    try:
        assert client.pod_status(again).status.network.ip == wanted_ip
    finally:
        cleanup(client, again)


@pytest.mark.parametrize("annotations, word", [({POD_IP_ANNOTATION: "10.1.2"}, "IP address"),
                                               ({POD_MAC_ANNOTATION: "zz:00"}, "MAC address")])
def test_bad_address_annotation_is_refused(client, annotations, word):
    with pytest.raises(grpc.RpcError) as err:
        client.run_pod(pod_config(annotations=annotations))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and word in err.value.details()
    assert not client.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items
