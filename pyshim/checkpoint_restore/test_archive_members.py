"""The archive's metadata members, built by the engine from the record, its configs and the image store."""
from types import SimpleNamespace

from cri_api import api_pb2 as cri
from pyshim.checkpoint_restore.archive_members import archive_members
from pyshim.checkpoint_restore.restore import POD_IPS_KEY

DIGEST = "sha256:" + "b" * 64


def _fixture(base_image_id=""):
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="web"),
                                 mounts=[cri.Mount(container_path="/data", host_path="/srv/data")])
    spec = {"process": {"args": ["sleep", "inf"]}, "root": {"path": "rootfs"}, "mounts": [], "linux": {}}
    record = SimpleNamespace(id="c1", created_at=5, image_ref="busybox:1", image_id=DIGEST, image_name="busybox:1",
                             base_image_id=base_image_id, log_path="/var/log/pods/x/web/0.log")
    containers = SimpleNamespace(config_of=lambda r: config, spec_of=lambda r: spec)
    image = SimpleNamespace(id=DIGEST, repo_tags=["busybox:1"], repo_digests=[f"busybox@{DIGEST}"])
    images = SimpleNamespace(get=lambda ref: image if ref == DIGEST else None)
    return containers, images, record


def test_members_name_the_base_image_the_pod_addresses_and_use_the_servers_status():
    containers, images, record = _fixture()
    sandbox = SimpleNamespace(ip="10.0.0.5", additional_ips=["fd00::5", ""])
    seen = []

    def status_of(r, config):
        seen.append((r.id, config.metadata.name))
        return cri.ContainerStatus(id=r.id)
    members = archive_members(containers, images, record, sandbox, status_of)
    assert seen == [("c1", "web")] and members.status.id == "c1"
    assert members.config.name == "web" and members.config.rootfs_image_ref == f"busybox@{DIGEST}"
    assert members.config.extra["engine"] == "pyshim" and members.config.extra[POD_IPS_KEY] == ["10.0.0.5", "fd00::5"]
    assert [m.destination for m in members.bind_mounts] == ["/data"] and members.log_path == record.log_path


def test_a_restored_container_names_the_image_under_its_checkpoint():
    containers, images, record = _fixture(base_image_id=DIGEST)
    record.image_id = "/ckpt/web.tar"  # restored from an archive: its "image" is the checkpoint
    members = archive_members(containers, images, record, None, lambda r, c: cri.ContainerStatus())
    assert members.config.rootfs_image == "busybox:1" and members.config.rootfs_image_ref == f"busybox@{DIGEST}"
    assert members.config.extra[POD_IPS_KEY] == []
    record.base_image_id = "sha256:" + "c" * 64  # a base image this node no longer has: bare hex
    members = archive_members(containers, images, record, None, lambda r, c: cri.ContainerStatus())
    assert members.config.rootfs_image_ref == "c" * 64
