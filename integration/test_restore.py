"""Restore through CreateContainer/StartContainer into a new pod: real runc restore + CRIU."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import os
import time
import uuid
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as cri
from integration.conftest import container_config, pod_config
from integration.test_checkpoint import COUNTER, checkpoint, counter_value
from integration.test_lifecycle import cleanup, run_container
from pyshim.internal.cri_log import read_log


@pytest.fixture
def archive_dir(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir(mode=0o700)
    return d


def restore_into_new_pod(client, image, name="restored", **kwargs):
    """What kubelet does with a checkpoint image (or crictl with an archive path): a new pod, then
    CreateContainer naming the checkpoint as image, then StartContainer."""
    pod = pod_config()
    pod_id = client.run_pod(pod)
    try:
        cid = client.create(pod_id, container_config(image, [], name=name, **kwargs), pod)
        client.start(cid)
    except BaseException:
        cleanup(client, pod_id)
        raise
    return pod, pod_id, cid


def log_texts(client, cid) -> list[str]:
    return [e.text for e in read_log(Path(client.status(cid).status.log_path))]


def checkpointed_counter(client, image, archive: Path, script: str = COUNTER) -> int:
    """Run a counter, checkpoint it, remove its pod; returns the counter's value at the checkpoint."""
    pod, pod_id, cid = run_container(client, image, ["sh", "-c", script])
    try:
        time.sleep(1)
        before = counter_value(client, cid)
        checkpoint(client, cid, archive)
        return before
    finally:
        cleanup(client, pod_id)


def test_restore_from_archive_continues_the_process_in_a_new_pod(client, pulled_busybox, archive_dir):
    archive = archive_dir / "counter.tar"
    at_checkpoint = checkpointed_counter(
        client, pulled_busybox, archive, f"echo added > /added-file; rm /etc/group; {COUNTER}")

    pod, pod_id, cid = restore_into_new_pod(client, str(archive))
    try:
        status = client.status(cid, verbose=True)
        assert status.status.state == cri.CONTAINER_RUNNING
        info = json.loads(status.info["info"])
        assert info["restored"] is True and info["restoredCheckpointTime"]
        assert info["restoreTcp"] == "none"

        # The process goes on counting from where it was, not from zero.
        first = counter_value(client, cid)
        assert first >= at_checkpoint
        time.sleep(0.5)
        assert counter_value(client, cid) > first
        texts = log_texts(client, cid)
        assert texts.count("tick 0\n") == 1, "the counter restarted instead of continuing"
        assert f"tick {first + 1}\n" in texts or f"tick {first + 2}\n" in texts or counter_value(client, cid) > first

        # The writable layer came along; node-managed files are the new pod's.
        assert client.exec_sync(cid, ["cat", "/added-file"]).stdout == b"added\n"
        assert client.exec_sync(cid, ["test", "-e", "/etc/group"]).exit_code == 1
        assert client.exec_sync(cid, ["hostname"]).stdout.decode().strip() == pod.hostname
    finally:
        cleanup(client, pod_id)


def unpacked_checkpoint(daemon, digest: str) -> Path:
    """Where the store keeps a checkpoint's CRIU images, unpacked once (criu_glue.checkpoint_cache)."""
    return daemon.settings.root / "images" / "checkpoints" / "sha256" / digest.removeprefix("sha256:")


def stored_hostname(entry: Path) -> str:
    from criu_glue import criu_images
    return criu_images.read_image(next(entry.glob("utsns-*.img")), criu_images.UTSNS).entries[0].nodename


def test_restoring_twice_from_one_archive_gives_two_independent_containers(client, daemon, pulled_busybox,
                                                                           archive_dir):
    archive = archive_dir / "counter.tar"
    checkpointed_counter(client, pulled_busybox, archive)
    _, pod_a, cid_a = restore_into_new_pod(client, str(archive))
    try:
        # The first restore unpacked the CRIU images into the store, keyed by the archive's sha256.
        entry = unpacked_checkpoint(daemon, hashlib.sha256(archive.read_bytes()).hexdigest())
        assert entry.is_dir() and (entry / "inventory.img").stat().st_mode & 0o777 == 0o444
        dumped_hostname = stored_hostname(entry)
        pod_b_config, pod_b, cid_b = restore_into_new_pod(client, str(archive))
        try:
            # Each restore got the new pod's hostname in a private UTS image; the shared one is untouched.
            assert client.exec_sync(cid_b, ["hostname"]).stdout.decode().strip() == pod_b_config.hostname
            assert stored_hostname(entry) == dumped_hostname != pod_b_config.hostname
            client.exec_sync(cid_a, ["sh", "-c", "echo only-a > /marker"])
            assert client.exec_sync(cid_b, ["test", "-e", "/marker"]).exit_code == 1
            client.stop(cid_a, timeout=0)
            time.sleep(0.3)
            assert client.status(cid_b).status.state == cri.CONTAINER_RUNNING
        finally:
            cleanup(client, pod_b)
    finally:
        cleanup(client, pod_a)


def test_restore_of_missing_or_corrupt_archive_is_refused_and_leaves_nothing(client, archive_dir):
    pod = pod_config()
    pod_id = client.run_pod(pod)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.create(pod_id, container_config(str(archive_dir / "nope.tar"), []), pod)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        corrupt = archive_dir / "corrupt.tar"
        corrupt.write_bytes(b"this is not a tar archive" * 100)
        with pytest.raises(grpc.RpcError) as err:
            client.create(pod_id, container_config(str(corrupt), []), pod)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "corrupt.tar" in err.value.details()
        assert not client.runtime.ListContainers(cri.ListContainersRequest()).containers
    finally:
        cleanup(client, pod_id)


SERVICES = ("nc -ll -p 8080 -e /bin/cat & sleep 0.3; "
            "(while true; do echo ping; sleep 0.1; done) | nc 127.0.0.1 8080 > /tmp/client.out & "
            "flock /tmp/held.lock sleep 1000000 & "
            f"{COUNTER}")


def lines_in(client, cid, path) -> int:
    return int(client.exec_sync(cid, ["sh", "-c", f"wc -l < {path}"]).stdout)


def test_restore_keeps_file_locks_and_listeners_and_closes_connections_to_a_lost_address(
        client, pulled_busybox, archive_dir):
    archive = archive_dir / "services.tar"
    checkpointed_counter(client, pulled_busybox, archive, SERVICES)
    _, pod_id, cid = restore_into_new_pod(client, str(archive))
    try:
        info = json.loads(client.status(cid, verbose=True).info["info"])
        # The new pod has another address, so the established connection cannot live on: closed.
        assert info["restoreTcp"] == "close"
        held = client.exec_sync(cid, ["flock", "-n", "/tmp/held.lock", "true"])
        assert held.exit_code != 0, "the restored process lost its flock"
        answer = client.exec_sync(cid, ["sh", "-c", "echo hello | timeout 3 nc 127.0.0.1 8080"])
        assert b"hello" in answer.stdout, "the restored listener does not accept connections"
    finally:
        cleanup(client, pod_id)


def test_restore_forced_established_keeps_a_connection_talking(client, pulled_busybox, archive_dir):
    archive = archive_dir / "services.tar"
    checkpointed_counter(client, pulled_busybox, archive, SERVICES)
    # Loopback connections survive any address change; the annotation forces CRIU's --tcp-established.
    _, pod_id, cid = restore_into_new_pod(client, str(archive),
                                          annotations={"io.pyshim.restore.tcp": "established"})
    try:
        assert json.loads(client.status(cid, verbose=True).info["info"])["restoreTcp"] == "established"
        before = lines_in(client, cid, "/tmp/client.out")
        time.sleep(0.6)
        assert lines_in(client, cid, "/tmp/client.out") > before, "the connection stopped echoing after restore"
    finally:
        cleanup(client, pod_id)


# ---- hostile and broken checkpoints ------------------------------------------------------------

def repack(archive: Path, out: Path, replace: dict[str, bytes] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of `archive` with some members' content replaced or dropped (a crafted checkpoint from a real one)."""
    replace = dict(replace or {})
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            name = member.name.lstrip("./")
            if name in drop:
                continue
            if name in replace:
                data = replace.pop(name)
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
            else:
                dst.addfile(member, src.extractfile(member) if member.isreg() else None)
        for name, data in replace.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            dst.addfile(info, io.BytesIO(data))
    out.chmod(0o600)
    return out


def tar_bytes(*entries: tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for entry in entries:
            info, data = entry if isinstance(entry, tuple) else (entry, b"")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def member(name: str, kind=tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o755 if kind != tarfile.REGTYPE else 0o644
    return info


def expect_failed_start(client, cid, code) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        client.start(cid)
    assert err.value.code() == code, err.value.details()
    status = client.status(cid).status
    assert status.state == cri.CONTAINER_EXITED and status.reason == "RestoreFailed"
    assert status.message
    return err.value


@pytest.fixture
def counter_archive(client, pulled_busybox, archive_dir) -> Path:
    archive = archive_dir / "counter.tar"
    checkpointed_counter(client, pulled_busybox, archive)
    return archive


def test_rootfs_diff_writing_through_a_symlink_is_refused(client, counter_archive, archive_dir, tmp_path):
    target = tmp_path / "host-dir"
    target.mkdir()
    hostile = repack(counter_archive, archive_dir / "hostile.tar", {"rootfs-diff.tar": tar_bytes(
        member("escape", tarfile.SYMTYPE, str(target)), (member("escape/pwned"), b"owned\n"))})
    pod = pod_config()
    pod_id = client.run_pod(pod)
    try:
        cid = client.create(pod_id, container_config(str(hostile), []), pod)
        error = expect_failed_start(client, cid, grpc.StatusCode.INVALID_ARGUMENT)
        assert "escape" in error.details()
        assert not list(target.iterdir()), "the archive wrote outside the container"
    finally:
        cleanup(client, pod_id)


def test_nothing_security_relevant_comes_from_the_archive(client, counter_archive, archive_dir):
    with tarfile.open(counter_archive) as tar:
        spec = json.loads(tar.extractfile("spec.dump").read())
    spec["annotations"].update({"cdi.k8s.io/smuggled": "vendor.com/gpu=all",
                                "io.kubernetes.container.hash": "from-the-archive"})
    spec["process"]["capabilities"] = {k: ["CAP_SYS_ADMIN", "CAP_SYS_MODULE"] for k in
                                       ("bounding", "effective", "permitted")}
    spec["linux"].setdefault("devices", []).append({"path": "/dev/sda", "type": "b", "major": 8, "minor": 0})
    crafted = repack(counter_archive, archive_dir / "crafted.tar", {"spec.dump": json.dumps(spec).encode()})
    # A host bind mount named by the archive is never made: it is demanded of the new request instead.
    spec_with_mount = dict(spec, mounts=spec["mounts"] + [
        {"destination": "/host", "type": "bind", "source": "/", "options": ["rbind", "rw"]}])
    with_mount = repack(counter_archive, archive_dir / "mount.tar", {"spec.dump": json.dumps(spec_with_mount).encode()})
    pod = pod_config()
    refused_pod = client.run_pod(pod)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.create(refused_pod, container_config(str(with_mount), []), pod)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "/host" in err.value.details()
    finally:
        cleanup(client, refused_pod)


    _, pod_id, cid = restore_into_new_pod(client, str(crafted), annotations={"io.kubernetes.container.hash": "new"})
    try:
        bundle = Path(json.loads(client.status(cid, verbose=True).info["info"])["bundle"])
        config = json.loads((bundle / "config.json").read_text())
        assert "cdi.k8s.io/smuggled" not in config["annotations"]
        assert config["annotations"].get("io.kubernetes.container.hash") == "new"
        assert client.status(cid).status.annotations["io.kubernetes.container.hash"] == "new"
        assert "/host" not in {m["destination"] for m in config["mounts"]}
        assert "CAP_SYS_MODULE" not in config["process"]["capabilities"]["bounding"]
        assert "/dev/sda" not in {d["path"] for d in config["linux"].get("devices", [])}
    finally:
        cleanup(client, pod_id)


def test_restore_without_a_bind_mount_the_process_expects_is_refused(client, pulled_busybox, archive_dir, tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    archive = archive_dir / "with-volume.tar"
    pod, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", COUNTER],
                                     mounts=[cri.Mount(container_path="/data", host_path=str(volume))])
    try:
        time.sleep(0.5)
        checkpoint(client, cid, archive)
    finally:
        cleanup(client, pod_id)
    pod = pod_config()
    pod_id = client.run_pod(pod)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.create(pod_id, container_config(str(archive), []), pod)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "/data" in err.value.details()
        assert not client.runtime.ListContainers(cri.ListContainersRequest()).containers
    finally:
        cleanup(client, pod_id)


def test_criu_restore_failure_reports_the_log_and_leaves_nothing(client, counter_archive, archive_dir):
    broken = repack(counter_archive, archive_dir / "broken.tar", {"checkpoint/pstree.img": b"\0" * 64})
    pod = pod_config()
    pod_id = client.run_pod(pod)
    try:
        cid = client.create(pod_id, container_config(str(broken), []), pod)
        error = expect_failed_start(client, cid, grpc.StatusCode.FAILED_PRECONDITION)
        assert "restore.log" in error.details() and "Error" in error.details()
        bundle = Path(json.loads(client.status(cid, verbose=True).info["info"])["bundle"])
        assert not (bundle / "checkpoint").exists(), "CRIU images left behind"
    finally:
        cleanup(client, pod_id)


def test_missing_base_image_is_pulled_again_by_digest(client, pulled_busybox, counter_archive):
    client.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=pulled_busybox)))
    try:
        _, pod_id, cid = restore_into_new_pod(client, str(counter_archive))
        try:
            base = json.loads(client.status(cid, verbose=True).info["info"])["baseImage"]
            image = client.images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=base))).image
            assert image.repo_digests, "the base image should come back by its digest reference"
            assert client.status(cid).status.state == cri.CONTAINER_RUNNING
        finally:
            cleanup(client, pod_id)
    finally:
        client.pull(pulled_busybox)  # later tests name it by tag


def test_restore_from_a_checkpoint_image_pulled_from_a_registry(client, daemon, registry, counter_archive):
    from integration.test_checkpoint_image import pyshim, remove_image

    tag = f"{registry.address}/checkpoints/counter-{uuid.uuid4().hex[:8]}:v1"
    root = str(daemon.settings.root)
    built = pyshim("checkpoint-image", "build", str(counter_archive), "--tag", tag, "--root", root)
    assert built.returncode == 0, built.stderr
    pushed = pyshim("checkpoint-image", "push", tag, "--root", root)
    assert pushed.returncode == 0, pushed.stderr
    remove_image(client, tag)
    entry = None
    try:
        used_before = client.images.ImageFsInfo(cri.ImageFsInfoRequest()).image_filesystems[0].used_bytes.value
        client.pull(tag)  # what kubelet does first with any image
        # PullImage put the layer's CRIU images into the store, and ImageFsInfo counts them.
        status = client.images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=tag), verbose=True))
        entry = unpacked_checkpoint(daemon, json.loads(status.info["info"])["layers"][0])
        assert entry.is_dir()
        unpacked_bytes = sum(f.stat().st_size for f in entry.iterdir())
        used_after = client.images.ImageFsInfo(cri.ImageFsInfoRequest()).image_filesystems[0].used_bytes.value
        assert used_after - used_before >= unpacked_bytes
        _, pod_a, cid_a = restore_into_new_pod(client, tag)
        try:
            status = client.status(cid_a, verbose=True)
            assert status.status.state == cri.CONTAINER_RUNNING and status.status.image.image == tag
            assert json.loads(status.info["info"])["restored"] is True
            assert counter_value(client, cid_a) > 0
            # kubelet restarting a restored container creates a new one from the same image: it restores again.
            _, pod_b, cid_b = restore_into_new_pod(client, tag, name="again")
            try:
                assert client.status(cid_b).status.state == cri.CONTAINER_RUNNING
            finally:
                cleanup(client, pod_b)
            with pytest.raises(grpc.RpcError) as err:
                remove_image(client, tag)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, "image in use was removed"
        finally:
            cleanup(client, pod_a)
    finally:
        remove_image(client, tag)
    assert entry is None or not entry.exists(), "the unpacked checkpoint outlived its image"


def test_restore_refuses_processes_with_more_privilege_than_the_new_request(client, counter_archive):
    fewer_caps = cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
        capabilities=cri.Capability(drop_capabilities=["NET_RAW"])))
    non_root = cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
        run_as_user=cri.Int64Value(value=1000)))
    for linux, words in ((fewer_caps, "CAP_NET_RAW"), (non_root, "runs as root")):
        pod = pod_config()
        pod_id = client.run_pod(pod)
        try:
            cid = client.create(pod_id, container_config(str(counter_archive), [], linux=linux), pod)
            error = expect_failed_start(client, cid, grpc.StatusCode.FAILED_PRECONDITION)
            assert words in error.details()
        finally:
            cleanup(client, pod_id)
