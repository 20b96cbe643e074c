"""portable_archive: the fields Podman, CRI-O and containerd read from a pyshim archive."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from criu_glue import archive_format as fmt
from criu_glue import criu_images
from criu_glue.criu import read_restore_facts
from criu_glue.portable_archive import (CRIO_ANNOTATIONS, forget_root_mode, libpod_config_fields,
                                        portable_spec)

FIXTURES = Path(__file__).parent / "testdata" / "criu-4.2-busybox"
IMAGE_HEX = "9a12e6ecda678007888f941ac3ecb9b3d895a725af0f9f0a3f9c4a8677f40096"
POD_FILES = "/var/lib/pyshim/sandboxes/0123abcd"

# What pyshim's config.json looks like in a pod (abridged to the parts that matter here).
SPEC = {
    "ociVersion": "1.0.2",
    "process": {"args": ["sh", "-c", "sleep 1000"], "user": {"uid": 0, "gid": 0}, "cwd": "/"},
    "root": {"path": "/var/lib/pyshim/containers/c1/rootfs"},
    "hostname": "web-0",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid"]},
        {"destination": "/etc/hostname", "type": "bind", "source": f"{POD_FILES}/hostname",
         "options": ["rbind", "rprivate", "rw"]},
        {"destination": "/etc/hosts", "type": "bind", "source": f"{POD_FILES}/hosts",
         "options": ["rbind", "rprivate", "rw"]},
        {"destination": "/etc/resolv.conf", "type": "bind", "source": f"{POD_FILES}/resolv.conf",
         "options": ["rbind", "rprivate", "rw"]},
        {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]},
        {"destination": "/cache", "source": "/srv/cache", "options": ["bind", "ro"]},
    ],
    "annotations": {"io.kubernetes.cri.container-name": "main",
                    "io.kubernetes.cri.sandbox-id": "0123abcd"},
    "linux": {
        "cgroupsPath": "/pyshim/0123abcd/c1",
        "namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/pyshim-0123abcd"},
                       {"type": "ipc", "path": f"{POD_FILES}/ipc"}, {"type": "uts", "path": f"{POD_FILES}/uts"},
                       {"type": "mount"}],
        "maskedPaths": ["/proc/keys"], "readonlyPaths": ["/proc/sys"],
    },
}
CRI_ANNOTATIONS = {"io.kubernetes.container.hash": "abc123", "team": "web"}


def test_portable_spec_keeps_nothing_of_the_old_pod():
    original = copy.deepcopy(SPEC)
    out = portable_spec(SPEC, ["/data", "/cache"], CRI_ANNOTATIONS)
    assert SPEC == original  # the container's own config is not touched
    assert out["linux"]["namespaces"] == [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]
    assert "cgroupsPath" not in out["linux"]
    assert not any(POD_FILES in json.dumps(v) for v in (out["mounts"], out["linux"]))
    # The request's volumes stay (pyshim and CRI-O require them in the new request), and so does
    # every mount that is not a bind.
    assert [m["destination"] for m in out["mounts"]] == ["/proc", "/dev/shm", "/data", "/cache"]
    assert out["linux"]["maskedPaths"] == ["/proc/keys"] and out["linux"]["readonlyPaths"] == ["/proc/sys"]
    assert out["process"] == SPEC["process"] and out["hostname"] == "web-0"


def test_portable_spec_carries_the_cri_annotations_as_crio_reads_them():
    out = portable_spec(SPEC, [], CRI_ANNOTATIONS)
    assert json.loads(out["annotations"][CRIO_ANNOTATIONS]) == CRI_ANNOTATIONS
    assert out["annotations"]["io.kubernetes.cri.container-name"] == "main"
    # No annotation makes checkpointctl (or pyshim's inspect) take it for CRI-O's or Podman's.
    assert "io.container.manager" not in out["annotations"]
    assert json.loads(portable_spec(SPEC, [], {})["annotations"][CRIO_ANNOTATIONS]) == {}


def test_portable_spec_passes_the_shape_check():
    fmt.check_spec_shape(portable_spec(SPEC, ["/data"], CRI_ANNOTATIONS))


def test_libpod_fields_for_a_root_container_in_a_pod_network():
    fields = libpod_config_fields(SPEC, "sha256:" + IMAGE_HEX)
    assert fields == {"rootfsImageID": IMAGE_HEX, "createNetNS": True, "stopTimeout": 10}


def test_libpod_fields_name_a_non_root_user_and_no_netns_on_the_host_network():
    spec = copy.deepcopy(SPEC)
    spec["process"]["user"] = {"uid": 1000, "gid": 3000}
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    fields = libpod_config_fields(spec, IMAGE_HEX)
    assert fields["user"] == "1000:3000" and "createNetNS" not in fields
    assert fields["rootfsImageID"] == IMAGE_HEX
    assert "rootfsImageID" not in libpod_config_fields(spec, "")


def test_config_dump_is_checkpointctls_and_libpods_at_once():
    """Go matches JSON keys case-insensitively: two keys differing only in case would land in the
    same field of libpod's or checkpointctl's struct. Both readers must find their values."""
    config = fmt.CheckpointConfig(
        id="c1", name="main", rootfs_image="127.0.0.1:5000/busybox:latest",
        rootfs_image_ref="127.0.0.1:5000/busybox@sha256:" + "ab" * 32,
        rootfs_image_name="127.0.0.1:5000/busybox:latest", runtime="runc",
        created_time_ns=1, checkpointed_time_ns=2,
        extra={"engine": "pyshim", "podIPs": ["10.88.0.2"], **libpod_config_fields(SPEC, "sha256:" + IMAGE_HEX)})
    doc = json.loads(config.to_json())
    assert len({k.lower() for k in doc}) == len(doc)
    # libpod: both image keys set (its validate()), a network namespace to create.
    assert doc["rootfsImageName"] and doc["rootfsImageID"] == IMAGE_HEX and doc["createNetNS"] is True
    # containerd pulls rootfsImageRef and tags it rootfsImageName.
    assert "@sha256:" in doc["rootfsImageRef"]
    back = fmt.CheckpointConfig.from_json(config.to_json())
    assert back.image_id == IMAGE_HEX  # pyshim finds the ID too
    assert back.rootfs_image_ref == config.rootfs_image_ref


def test_forget_root_mode_drops_only_the_roots_mode(tmp_path):
    images = tmp_path / "images"
    shutil.copytree(FIXTURES, images)
    before = criu_images.read_image(images / "files.img", criu_images.FILES)
    assert read_restore_facts(images).root_mode is not None

    assert forget_root_mode(images) >= 1

    after = criu_images.read_image(images / "files.img", criu_images.FILES)
    assert read_restore_facts(images).root_mode is None
    assert len(after.entries) == len(before.entries)
    for old, new in zip(before.entries, after.entries):
        if new.HasField("reg") and new.reg.name == "/":
            assert not new.reg.HasField("mode")
            old.reg.ClearField("mode")
        assert old == new  # everything else as CRIU wrote it
    assert forget_root_mode(images) == 0  # nothing left to drop


def test_forget_root_mode_without_files_image(tmp_path):
    assert forget_root_mode(tmp_path) == 0
