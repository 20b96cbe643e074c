"""Restorer's decisions: TCP mode, bind mounts the archive expects, engine stand-ins, the gate."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from cri_api import api_pb2 as cri
from criu_glue.criu import CriuAvailability, ProcessCredentials, SeccompMode
from pyshim.config import CheckpointSettings
from pyshim.errors import FailedPrecondition, InvalidArgument, NotFound
from pyshim.checkpoint_restore.restore import TCP_ANNOTATION, Restorer, RestorePlan, TcpMode

USABLE = CriuAvailability(True, "4.2.1", "")


def plan(**kwargs) -> RestorePlan:
    values = dict(source=Path("/x.tar"), checkpoint_name="main", base_image_refs=("busybox",), checkpointed_at_ns=1,
                  established_tcp=True, checkpoint_ips=("10.85.0.5",), process_args=("sh",))
    values.update(kwargs)
    return RestorePlan(**values)


@pytest.mark.parametrize("established, annotations, pod_ips, expected", [
    (False, {}, ["10.85.0.5"], TcpMode.NONE),
    (True, {}, ["10.85.0.5"], TcpMode.ESTABLISHED),      # the address lives on: keep connections
    (True, {}, ["10.85.0.9"], TcpMode.CLOSE),            # another address: close them, keep listeners
    (True, {}, [""], TcpMode.CLOSE),
    (True, {TCP_ANNOTATION: "established"}, ["10.85.0.9"], TcpMode.ESTABLISHED),
    (True, {TCP_ANNOTATION: "close"}, ["10.85.0.5"], TcpMode.CLOSE),
    (False, {TCP_ANNOTATION: "established"}, ["10.85.0.5"], TcpMode.NONE),  # nothing to keep
])
def test_tcp_mode(established, annotations, pod_ips, expected):
    assert Restorer.tcp_mode(plan(established_tcp=established), annotations, pod_ips) == expected


@pytest.mark.parametrize("value", ["none", "keep", "ESTABLISHED"])
def test_tcp_annotation_values_other_than_established_or_close_are_refused(value):
    with pytest.raises(InvalidArgument, match=TCP_ANNOTATION):
        Restorer.tcp_mode(plan(), {TCP_ANNOTATION: value}, [])


def test_runc_restore_args_always_keep_locks_and_ignore_old_cgroups():
    assert Restorer.runc_restore_args(TcpMode.NONE) == ("--file-locks", "--manage-cgroups-mode=ignore")
    assert "--tcp-established" in Restorer.runc_restore_args(TcpMode.ESTABLISHED)
    assert "--tcp-established" not in Restorer.runc_restore_args(TcpMode.CLOSE)


def test_tcp_close_goes_through_a_criu_config_file(tmp_path):
    assert Restorer.write_criu_config(TcpMode.ESTABLISHED, tmp_path / "c.conf") is None
    path = Restorer.write_criu_config(TcpMode.CLOSE, tmp_path / "c.conf")
    assert path.read_text().split() == ["tcp-close"]


def test_engine_placeholders_replace_missing_or_non_bind_mounts(tmp_path):
    spec = {"mounts": [{"destination": "/dev/shm", "type": "tmpfs", "source": "shm"},
                       {"destination": "/etc/hosts", "type": "bind", "source": "/pod/hosts", "options": ["rbind"]}]}
    p = plan(engine_bind_mounts=("/dev/shm", "/etc/hosts", "/run/.containerenv"))
    Restorer.add_engine_placeholders(spec, p, tmp_path)
    by_dest = {m["destination"]: m for m in spec["mounts"]}
    assert by_dest["/etc/hosts"]["source"] == "/pod/hosts", "the new pod's own file must win"
    assert by_dest["/dev/shm"]["type"] == "bind" and Path(by_dest["/dev/shm"]["source"]).is_dir()
    env = Path(by_dest["/run/.containerenv"]["source"])
    assert env.is_file() and env.is_relative_to(tmp_path) and "ro" in by_dest["/run/.containerenv"]["options"]
    assert len(spec["mounts"]) == 3


def _archive(path: Path, spec_mounts=(), bind_mounts=(), spec: bytes | None = None,
             config_extra: dict | None = None) -> Path:
    members = {
        "config.dump": json.dumps({"id": "c1", "name": "main", "rootfsImageName": "busybox:latest",
                                   "rootfsImageRef": "sha256:" + "a" * 64,
                                   "checkpointedTime": "2026-11-21T06:00:00Z", **(config_extra or {})}).encode(),
        "spec.dump": spec if spec is not None else
        json.dumps({"process": {"args": ["sh", "-c", "x"]}, "mounts": list(spec_mounts)}).encode(),
        "bind.mounts": json.dumps(list(bind_mounts)).encode(),
        "checkpoint/inventory.img": b"\0" * 8,
    }
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("checkpoint")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _config(*mount_paths: str):
    return cri.ContainerConfig(mounts=[cri.Mount(container_path=p, host_path="/srv" + p) for p in mount_paths])


def test_plan_reads_what_restore_needs(tmp_path):
    archive = _archive(tmp_path / "a.tar", spec_mounts=[
        {"destination": "/etc/hosts", "type": "bind", "source": "/old/hosts"},
        {"destination": "/proc", "type": "proc", "source": "proc"}])
    p = Restorer(CheckpointSettings(), USABLE).plan(archive, _config())
    assert p.base_image_refs[0] == "sha256:" + "a" * 64 and "busybox:latest" in p.base_image_refs
    assert p.process_args == ("sh", "-c", "x") and p.checkpointed_at_ns > 0
    assert p.engine_bind_mounts == ("/etc/hosts",) and p.expected_bind_mounts == ()
    assert not p.established_tcp


def test_plan_refuses_when_the_request_lacks_a_volume_the_process_had(tmp_path):
    archive = _archive(tmp_path / "a.tar", spec_mounts=[{"destination": "/data", "type": "bind", "source": "/x"}],
                       bind_mounts=[{"source": "/x", "destination": "/cache", "file_type": "directory",
                                     "permissions": 0o755}])
    restorer = Restorer(CheckpointSettings(), USABLE)
    with pytest.raises(InvalidArgument, match="/cache, /data"):
        restorer.plan(archive, _config())
    assert restorer.plan(archive, _config("/data", "/cache")).expected_bind_mounts == ("/cache", "/data")


def test_plan_of_missing_or_broken_archives(tmp_path):
    restorer = Restorer(CheckpointSettings(), USABLE)
    with pytest.raises(NotFound):
        restorer.plan(tmp_path / "missing.tar", _config())
    (tmp_path / "junk.tar").write_bytes(b"junk" * 300)
    with pytest.raises(InvalidArgument, match="junk.tar"):
        restorer.plan(tmp_path / "junk.tar", _config())


@pytest.mark.parametrize("spec, where", [
    (b'{"process": "sh"}', "process must be an object"),
    (b'{"process": {"args": "sh -c x"}}', "process.args must be an array"),
    (b'{"process": {"args": ["sh", 1]}}', r"process.args\[1\] must be a string"),
    (b'{"process": {"user": {"uid": "0"}}}', "process.user.uid must be an integer"),
    (b'{"mounts": {"/data": "x"}}', "mounts must be an array"),
    (b'{"mounts": ["/data"]}', r"mounts\[0\] must be an object"),
    (b'{"mounts": [{"destination": 5}]}', r"mounts\[0\].destination must be a string"),
    (b'{"annotations": ["a"]}', "annotations must be an object"),
    (b'{"linux": {"readonlyPaths": "/proc/sys"}}', "linux.readonlyPaths must be an array"),
    (b'{"a": ' * 100_000 + b'1' + b'}' * 100_000, "too deeply"),
    (b'[' * 100_000 + b']' * 100_000, "too deeply"),
])
def test_spec_dump_of_the_wrong_shape_is_invalid_argument(tmp_path, spec, where):
    archive = _archive(tmp_path / "a.tar", spec=spec)
    with pytest.raises(InvalidArgument, match=f"spec.dump: .*{where}"):
        Restorer(CheckpointSettings(), USABLE).plan(archive, _config())


@pytest.mark.parametrize("extra", [{"podIPs": 7}, {"podIPs": "10.0.0.1"}, {"podIPs": {"a": 1}}])
def test_config_dump_of_the_wrong_shape_is_invalid_argument(tmp_path, extra):
    archive = _archive(tmp_path / "a.tar", config_extra=extra)
    with pytest.raises(InvalidArgument, match="podIPs"):
        Restorer(CheckpointSettings(), USABLE).plan(archive, _config())


def test_restore_gate():
    with pytest.raises(FailedPrecondition, match="enable_restore"):
        Restorer(CheckpointSettings(enable_restore=False), USABLE).check_enabled()
    with pytest.raises(FailedPrecondition, match="too old"):
        Restorer(CheckpointSettings(), CriuAvailability(False, "3.17", "CRIU 3.17 is too old")).check_enabled()
    Restorer(CheckpointSettings(), USABLE).check_enabled()


def creds(seccomp_mode=SeccompMode.FILTER, image="core-1.img") -> ProcessCredentials:
    return ProcessCredentials(image=image, uids=(0, 0, 0, 0), gids=(0, 0, 0, 0),
                              capabilities=frozenset({"CAP_CHOWN"}), seccomp_mode=seccomp_mode)


def restored_spec(seccomp: dict | None) -> dict:
    spec = {"process": {"user": {"uid": 0}, "capabilities": {"bounding": ["CAP_CHOWN"]}}, "linux": {}}
    if seccomp is not None:
        spec["linux"]["seccomp"] = seccomp
    return spec


def test_a_process_without_seccomp_filter_is_refused_when_the_request_asks_for_a_profile():
    profile = {"defaultAction": "SCMP_ACT_ERRNO"}
    with pytest.raises(FailedPrecondition, match=r"\(core-7.img\) ran without a seccomp filter"):
        Restorer.check_privileges([creds(), creds(SeccompMode.DISABLED, "core-7.img")], restored_spec(profile))
    # a filtered (or strict) process, a zombie's image, or a request that is unconfined / privileged: fine
    Restorer.check_privileges([creds(), creds(SeccompMode.STRICT), creds(None)], restored_spec(profile))
    Restorer.check_privileges([creds(SeccompMode.DISABLED)], restored_spec(None))
    Restorer.check_privileges([creds(SeccompMode.FILTER)], restored_spec(None))


@pytest.mark.parametrize("spec, privileged, keep", [
    ({"process": {"user": {"uid": 0, "gid": 0}}}, False, True),
    ({"process": {"user": {"uid": 1000, "gid": 1000}}}, False, False),
    ({"process": {"user": {"uid": 1000, "gid": 0}}}, False, False),   # gid 0 is not root
    ({"process": {"user": {"uid": 1000}}}, True, True),
])
def test_setid_bits_are_kept_only_for_root_or_privileged_containers(spec, privileged, keep):
    assert Restorer.keeps_setid_bits(spec, privileged) is keep


def test_mounts_weaker_than_the_request_are_refused(tmp_path):
    from criu_glue.restore_mounts import ImageMount
    spec = {"mounts": [{"destination": "/proc", "type": "proc", "source": "proc",
                        "options": ["nosuid", "noexec", "nodev"]}],
            "linux": {"readonlyPaths": ["/proc/sys"], "maskedPaths": []}}
    proc = ImageMount("mountpoints-13.img", 116, 115, "/proc", 1, "/", 0x20000e)
    ro_sys = ImageMount("mountpoints-13.img", 72, 116, "/proc/sys", 1, "/sys", 0x20000f)
    Restorer.check_mounts((proc, ro_sys), spec, tmp_path)
    with pytest.raises(FailedPrecondition, match="/proc/sys is writable"):
        Restorer.check_mounts((proc,), spec, tmp_path)


def _archive_with_real_images(path: Path) -> Path:
    """_archive's metadata with the CRIU images CRIU 4.2.1 wrote for criu_glue's tests."""
    _archive(path)
    fixtures = Path(__file__).resolve().parents[2] / "criu_glue" / "testdata" / "criu-4.2-busybox"
    with tarfile.open(path, "a") as tar:
        for image in sorted(fixtures.iterdir()):
            if image.name != "inventory.img":  # _archive has one
                tar.add(image, f"checkpoint/{image.name}")
    return path


def test_unpack_links_the_stored_images_and_gives_each_restore_its_hostname(tmp_path):
    from criu_glue.checkpoint_cache import CheckpointCache
    from criu_glue.criu import SeccompMode
    from oci.store import ImageStore

    store = ImageStore(tmp_path / "store")
    restorer = Restorer(CheckpointSettings(), USABLE, cache=CheckpointCache(store))
    archive = _archive_with_real_images(tmp_path / "a.tar")
    results = []
    for name in ("one", "two"):
        bundle = tmp_path / name
        (bundle / "rootfs").mkdir(parents=True)
        with restorer.open(archive, _config()) as checkpoint:
            results.append(restorer.unpack(checkpoint, bundle / "checkpoint", bundle / "rootfs", "", f"pod-{name}"))
    first, second = results
    assert not first.images_from_cache and second.images_from_cache
    assert first.facts.seccomp_modes["core-1.img"] == SeccompMode.FILTER and len(first.credentials) == 5
    assert "criu_images_unpack" in first.milliseconds
    (entry,) = (store.root / "checkpoints" / "sha256").iterdir()
    for name in ("one", "two"):
        images = tmp_path / name / "checkpoint"
        assert (images / "core-1.img").stat().st_ino == (entry / "core-1.img").stat().st_ino
        assert (images / "utsns-12.img").stat().st_ino != (entry / "utsns-12.img").stat().st_ino
        assert f"pod-{name}".encode() in (images / "utsns-12.img").read_bytes()
    assert b"fixture-host" in (entry / "utsns-12.img").read_bytes()
    store.close()
