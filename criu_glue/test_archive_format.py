import json
import os
import stat
import tempfile
from pathlib import Path

import pytest

from criu_glue.archive_format import (
    CONFIG_DUMP, GO_ZERO_TIME, BindMount, CheckpointConfig, bind_mounts_from_json,
    bind_mounts_to_json, deleted_files_from_json, deleted_files_to_json, format_rfc3339_ns,
    json_object_from, parse_rfc3339_ns, status_from_json, status_to_json, write_config,
    write_member, write_status)
from criu_glue.errors import ArchiveFormatError

# The shape CRI-O writes (checkpointctl's ContainerConfig), including a non-UTC offset.
CRIO_CONFIG = {
    "id": "6924be1bd90c",
    "name": "k8s_app_web-0_default_6975ee47_0",
    "rootfsImage": "docker.io/library/nginx:1.25",
    "rootfsImageRef": "a8758716bb6aa4d90071160d27028fe4eaee7ce8166221a97d30440c8eac2be6",
    "rootfsImageName": "docker.io/library/nginx:1.25",
    "runtime": "runc",
    "createdTime": "2024-01-27T14:45:26.083444055Z",
    "checkpointedTime": "2024-01-28T00:10:45.67353+05:30",
    "restoredTime": "0001-01-01T00:00:00Z",
    "restored": False,
}


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="criu-glue-test-") as d:
        yield Path(d)


@pytest.mark.parametrize("text,expected", [
    ("1970-01-01T00:00:00Z", 0),
    ("1970-01-01T00:00:01.5Z", 1_500_000_000),
    ("2024-01-27T14:45:26.083444055Z", 1706366726_083444055),
    ("2024-01-28T00:10:45.67353+05:30", 1706380845_673530000),
    ("2024-01-27T13:40:45.000000001-05:00", 1706380845_000000001),
    (GO_ZERO_TIME, None),
])
def test_rfc3339_parse_keeps_nanoseconds_and_offsets(text, expected):
    assert parse_rfc3339_ns(text) == expected


@pytest.mark.parametrize("text", ["2024-02-30T00:00:00Z", "2024-01-01 00:00:00Z",
                                  "2024-01-01T00:00:00", "2024-01-01T00:00:00.1234567890Z",
                                  "yesterday", "2024-01-01T00:00:00+25:00"])
def test_rfc3339_parse_refuses_malformed_times(text):
    with pytest.raises(ValueError):
        parse_rfc3339_ns(text)


def test_rfc3339_format_is_gos_rfc3339nano_in_utc():
    assert format_rfc3339_ns(1706366726_083444055) == "2024-01-27T14:45:26.083444055Z"
    assert format_rfc3339_ns(1706366726_500000000) == "2024-01-27T14:45:26.5Z"
    assert format_rfc3339_ns(1706366726_000000000) == "2024-01-27T14:45:26Z"
    assert format_rfc3339_ns(None) == GO_ZERO_TIME
    for ns in (0, 1, 999_999_999, 1706380845_673530000, -1):
        assert parse_rfc3339_ns(format_rfc3339_ns(ns)) == ns


def test_config_reads_crio_layout():
    cfg = CheckpointConfig.from_json(json.dumps(CRIO_CONFIG))
    assert cfg.id == "6924be1bd90c"
    assert cfg.rootfs_image_ref.startswith("a875")
    assert cfg.runtime == "runc"
    assert cfg.created_time_ns == 1706366726_083444055
    assert cfg.checkpointed_time_ns == 1706380845_673530000
    assert cfg.restored_time_ns is None
    assert cfg.restored is False
    assert cfg.extra == {}


def test_config_round_trip_keeps_instants_and_unknown_keys():
    podman_like = dict(CRIO_CONFIG, rootfsImageID="a875", spec={"ociVersion": "1.0.2"},
                       restored=True)
    cfg = CheckpointConfig.from_json(json.dumps(podman_like).encode())
    again = CheckpointConfig.from_json(cfg.to_json())
    assert again == cfg
    out = json.loads(cfg.to_json())
    assert out["rootfsImageID"] == "a875" and out["spec"] == {"ociVersion": "1.0.2"}
    # Offsets are normalised to UTC; the instant is unchanged.
    assert out["checkpointedTime"] == "2024-01-27T18:40:45.67353Z"
    assert out["restoredTime"] == GO_ZERO_TIME
    assert list(out)[:10] == list(CRIO_CONFIG)


# Trimmed from a real `podman container checkpoint --export` (Podman 5.4.2): libpod's whole
# container config, with the base image as rootfsImageID + rootfsImageName and no
# rootfsImage, rootfsImageRef or checkpointedTime.
PODMAN_CONFIG = {
    "spec": {"ociVersion": "1.2.0", "process": {"args": ["sh", "-c", "sleep 1000"]}},
    "id": "b89e05be03a3f1aa057262b9b9115590271fb15decca875e593270809aeccd95",
    "name": "counter1",
    "lockID": 0,
    "RawImageName": "127.0.0.1:34781/busybox:latest",
    "rootfsImageID": "342d978248bdf51c48566a183e94196611bd7fb368361e394e6a0f60ea5b87d5",
    "rootfsImageName": "127.0.0.1:34781/busybox:latest",
    "mounts": ["/var/lib/containers/storage/overlay-containers/b89e/userdata/shm"],
    "createdTime": "2026-11-21T06:59:04.871689023Z",
    "logPath": "/var/lib/containers/storage/overlay-containers/b89e/userdata/ctr.log",
    "logDriver": "k8s-file",
    "runtime": "runc",
}


def test_config_reads_podman_layout_and_its_image_id():
    cfg = CheckpointConfig.from_json(json.dumps(PODMAN_CONFIG))
    assert (cfg.id, cfg.name, cfg.runtime) == (PODMAN_CONFIG["id"], "counter1", "runc")
    assert cfg.rootfs_image == cfg.rootfs_image_ref == ""
    assert cfg.rootfs_image_name == "127.0.0.1:34781/busybox:latest"
    assert cfg.image_id == PODMAN_CONFIG["rootfsImageID"]
    assert cfg.created_time_ns == 1795244344_871689023 and cfg.checkpointed_time_ns is None
    assert cfg.extra["mounts"] == PODMAN_CONFIG["mounts"] and "image_id" not in json.loads(cfg.to_json())


@pytest.mark.parametrize("doc,image_id", [
    (CRIO_CONFIG, CRIO_CONFIG["rootfsImageRef"]),
    (dict(CRIO_CONFIG, rootfsImageRef="sha256:" + "ab" * 32), "sha256:" + "ab" * 32),
    (dict(CRIO_CONFIG, rootfsImageRef="docker.io/library/nginx@sha256:" + "ab" * 32), ""),
    (dict(CRIO_CONFIG, rootfsImageRef="", rootfsImageID="cd" * 32), "cd" * 32),
    (dict(PODMAN_CONFIG, rootfsImageID="not-an-id"), ""),
    (dict(PODMAN_CONFIG, rootfsImageID=42), ""),
    ({"id": "c", "name": "n"}, ""),
])
def test_config_image_id_is_an_id_or_nothing(doc, image_id):
    assert CheckpointConfig.from_json(json.dumps(doc)).image_id == image_id


def test_config_omits_empty_image_fields_like_go_omitempty():
    out = json.loads(CheckpointConfig(id="c1", name="web").to_json())
    assert out == {"id": "c1", "name": "web", "createdTime": GO_ZERO_TIME,
                   "checkpointedTime": GO_ZERO_TIME, "restoredTime": GO_ZERO_TIME,
                   "restored": False}


def test_config_extra_may_not_shadow_known_keys():
    with pytest.raises(ValueError, match="runtime"):
        CheckpointConfig(id="c", name="n", extra={"runtime": "crun"}).to_json()


@pytest.mark.parametrize("doc,key", [
    ({"name": "n"}, "'id' is missing"),
    ({"id": "c"}, "'name' is missing"),
    ({"id": 7, "name": "n"}, "'id' must be a string"),
    ({"id": "c", "name": "n", "createdTime": 17}, "'createdTime' must be a string"),
    ({"id": "c", "name": "n", "checkpointedTime": "now"}, "'checkpointedTime'"),
    ({"id": "c", "name": "n", "restored": "false"}, "'restored' must be a boolean"),
])
def test_config_errors_name_the_key(doc, key):
    with pytest.raises(ArchiveFormatError, match=key) as err:
        CheckpointConfig.from_json(json.dumps(doc), archive="/x/cp.tar")
    assert "/x/cp.tar" in str(err.value) and CONFIG_DUMP in str(err.value)


@pytest.mark.parametrize("data", [b"{", b"[]", b"\xff\xfe", b"null"])
def test_config_that_is_not_a_json_object_is_a_format_error(data):
    with pytest.raises(ArchiveFormatError, match=CONFIG_DUMP):
        CheckpointConfig.from_json(data)


def test_bind_mounts_round_trip_with_crio_keys():
    mounts = [BindMount("/var/lib/kubelet/pods/u/etc-hosts", "/etc/hosts", "file", 0o644),
              BindMount("/data", "/srv/data", "directory", 0o755)]
    data = bind_mounts_to_json(mounts)
    assert json.loads(data)[0] == {"source": "/var/lib/kubelet/pods/u/etc-hosts",
                                   "destination": "/etc/hosts", "file_type": "file",
                                   "permissions": 420}
    assert bind_mounts_from_json(data) == mounts
    assert bind_mounts_from_json(b"null") == []


@pytest.mark.parametrize("doc,why", [
    ({}, "must be a JSON array"),
    ([{"source": "/a", "destination": "/b", "file_type": "socket", "permissions": 0}],
     "file_type"),
    ([{"source": "/a", "destination": "b", "file_type": "file", "permissions": 0}],
     "absolute"),
    ([{"source": "/a", "destination": "/b", "file_type": "file", "permissions": True}],
     "permissions"),
    ([{"source": "/a", "destination": "/b", "file_type": "file", "permissions": 70000}],
     "permissions"),
    ([{"destination": "/b", "file_type": "file", "permissions": 1}], "entry 0: key 'source'"),
])
def test_bind_mounts_validation(doc, why):
    with pytest.raises(ArchiveFormatError, match=why):
        bind_mounts_from_json(json.dumps(doc))


def test_deleted_files_round_trip_and_validation():
    paths = ["/etc/motd", "/var/cache/apt", "/tmp/caf\u00e9"]
    assert deleted_files_from_json(deleted_files_to_json(paths)) == paths
    assert deleted_files_from_json(b"null") == []
    for bad in ({"a": 1}, [1], [""], ["/a\u0000b"]):
        with pytest.raises(ArchiveFormatError, match="deleted.files"):
            deleted_files_from_json(json.dumps(bad))


def test_json_object_members():
    assert json_object_from(b'{"ociVersion": "1.0.2"}', "spec.dump") == {"ociVersion": "1.0.2"}
    with pytest.raises(ArchiveFormatError, match="spec.dump: must be a JSON object"):
        json_object_from(b"[1]", "spec.dump")


def test_members_are_written_private_and_top_level_only(tmp_path):
    old = os.umask(0)
    try:
        (tmp_path / CONFIG_DUMP).write_bytes(b"old")
        os.chmod(tmp_path / CONFIG_DUMP, 0o666)
        path = write_config(tmp_path, CheckpointConfig(id="c", name="n"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert CheckpointConfig.from_json(path.read_bytes()).id == "c"
    for bad in ("a/b", "..", ""):
        with pytest.raises(ValueError):
            write_member(tmp_path, bad, b"")
    os.symlink("/etc/passwd", tmp_path / "link")
    with pytest.raises(OSError):
        write_member(tmp_path, "link", b"x")  # never written through a symlink


# ---------------------------------------------------------------- status.dump

# What containerd 2.x writes (json.Marshal of the gogo-generated runtime.ContainerStatus) for a
# running container, and what its restore json.Unmarshal-s: proto field names, numeric enums,
# int64 as numbers, zero values left out.
CONTAINERD_STATUS = """{
  "id": "3b2f7d1e9c4a5b6d8e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d",
  "metadata": {"name": "counter", "attempt": 1},
  "state": 1,
  "created_at": 1733220000123456789,
  "started_at": 1733220000223456789,
  "image": {"image": "docker.io/library/busybox:1.36",
            "user_specified_image": "busybox:1.36"},
  "image_ref": "docker.io/library/busybox@sha256:7b3ccabffc97de872a30dfd234fd972a66d247c8cfc69b0550f276481852627c",
  "labels": {"io.kubernetes.container.name": "counter", "io.kubernetes.pod.name": "web-0",
             "io.kubernetes.pod.namespace": "default"},
  "annotations": {"io.kubernetes.container.hash": "8a2b4c1d",
                  "io.kubernetes.container.restartCount": "1"},
  "mounts": [{"container_path": "/data", "host_path": "/srv/data", "propagation": 2},
             {"container_path": "/etc/hosts", "host_path": "/var/lib/kubelet/pods/u/etc-hosts",
              "readonly": true}],
  "log_path": "/var/log/pods/default_web-0_u/counter/1.log",
  "resources": {"linux": {"cpu_period": 100000, "cpu_quota": 50000, "cpu_shares": 512,
                          "memory_limit_in_bytes": 268435456, "oom_score_adj": 1000,
                          "unified": {"memory.high": "200M"}}},
  "image_id": "sha256:7b3ccabffc97de872a30dfd234fd972a66d247c8cfc69b0550f276481852627c",
  "user": {"linux": {"gid": 10, "supplemental_groups": [10, 20]}}
}"""


def _container_status():
    from cri_api import api_pb2 as cri
    return cri.ContainerStatus()


def test_status_reads_containerds_go_form():
    from cri_api import api_pb2 as cri
    status = status_from_json(CONTAINERD_STATUS, _container_status())
    assert status.state == cri.CONTAINER_RUNNING
    assert status.created_at == 1733220000123456789
    assert status.metadata.name == "counter" and status.metadata.attempt == 1
    assert status.image.user_specified_image == "busybox:1.36"
    assert status.mounts[0].propagation == cri.PROPAGATION_BIDIRECTIONAL
    assert status.mounts[1].readonly and status.mounts[1].host_path.endswith("etc-hosts")
    assert status.resources.linux.memory_limit_in_bytes == 268435456
    assert status.resources.linux.unified == {"memory.high": "200M"}
    assert list(status.user.linux.supplemental_groups) == [10, 20]
    assert status.labels["io.kubernetes.pod.name"] == "web-0"


def test_status_round_trip_is_containerds_form_byte_for_byte_in_meaning():
    status = status_from_json(CONTAINERD_STATUS, _container_status())
    written = json.loads(status_to_json(status))
    expected = json.loads(CONTAINERD_STATUS)
    assert written == expected
    assert list(written) == list(expected)  # the Go struct's field order
    assert isinstance(written["state"], int) and isinstance(written["created_at"], int)
    assert isinstance(written["mounts"][0]["propagation"], int)


def test_status_leaves_out_zero_values_as_omitempty_does():
    from cri_api import api_pb2 as cri
    status = cri.ContainerStatus(id="a", state=cri.CONTAINER_CREATED, exit_code=0,
                                 metadata=cri.ContainerMetadata(name="x"),
                                 resources=cri.ContainerResources())
    # CONTAINER_CREATED is 0: Go leaves the zero enum out too; a present empty message is {}.
    assert json.loads(status_to_json(status)) == {"id": "a", "metadata": {"name": "x"},
                                                  "resources": {}}


def test_status_still_reads_protobuf_json_of_older_pyshim_archives():
    from cri_api import api_pb2 as cri
    old = {"id": "a", "metadata": {"name": "app"}, "state": "CONTAINER_EXITED",
           "createdAt": "1733220000123456789", "exitCode": 137, "imageRef": "sha256:ab",
           "mounts": [{"containerPath": "/data", "hostPath": "/srv", "propagation":
                       "PROPAGATION_BIDIRECTIONAL"}]}
    status = status_from_json(json.dumps(old), _container_status())
    assert status.state == cri.CONTAINER_EXITED and status.exit_code == 137
    assert status.created_at == 1733220000123456789 and status.image_ref == "sha256:ab"
    assert status.mounts[0].propagation == cri.PROPAGATION_BIDIRECTIONAL
    assert json.loads(status_to_json(status))["state"] == cri.CONTAINER_EXITED


def test_status_ignores_unknown_keys_as_go_does():
    status = status_from_json('{"id": "a", "future_field": {"x": 1}}', _container_status())
    assert status.id == "a"


@pytest.mark.parametrize("doc", ['[]', '{"state": [1]}', '{"created_at": "soon"}',
                                 '{"metadata": 3}', '{"mounts": {"a": 1}}',
                                 '{"labels": ' * 5000 + '{}' + '}' * 5000])
def test_status_refuses_what_is_not_a_container_status(doc):
    with pytest.raises(ArchiveFormatError, match="status.dump"):
        status_from_json(doc, _container_status())


def test_write_status_writes_go_form(tmp_path):
    from cri_api import api_pb2 as cri
    path = write_status(tmp_path, cri.ContainerStatus(id="a", state=cri.CONTAINER_RUNNING,
                                                      created_at=5))
    assert json.loads(path.read_bytes()) == {"id": "a", "state": 1, "created_at": 5}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
