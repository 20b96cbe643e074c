"""ContainerStatus and ListContainers."""
from __future__ import annotations

import json
import time

from google.protobuf import json_format

from cri_api import api_pb2 as cri
from pyshim.checkpoint_restore.records import CheckpointFacts
from pyshim.server import convert
from pyshim.server.runtime import Runtime


def container_status(rt: Runtime, request) -> "cri.ContainerStatusResponse":
    record = rt.containers.get(request.container_id)
    config = rt.containers.config_of(record)
    info = {}
    if request.verbose:
        info["info"] = json.dumps({
            "pid": record.pid, "sandboxID": record.sandbox_id, "bundle": record.dir,
            "cgroupsPath": record.cgroups_path, "imageRef": record.image_ref,
            **_checkpoint_info(record.last_checkpoint),
            # What the container was created with, as containerd shows it: tools that move a
            # container (pyshim migrate, host restart) recreate it from this.
            "config": json_format.MessageToDict(config),
            **_restore_info(record),
            **rt.restores.lazy_status(record),  # post-copy restores: whether every page has arrived
            **(rt.lazy_checkpoints.status(record.id) if rt.lazy_checkpoints else {}),  # migrate --lazy source
        })
    status = convert.container_status(record, config)
    user = _process_user(rt, record)
    if user is not None:
        status.user.CopyFrom(user)
    return cri.ContainerStatusResponse(status=status, info=info)


def _process_user(rt: Runtime, record) -> "cri.ContainerUser | None":
    """The identity the container's first process runs with, from its OCI config, as containerd
    reports it: supplemental groups include the primary group (they are what setgroups(2) got)."""
    try:
        user = rt.containers.spec_of(record).get("process", {}).get("user", {})
    except (OSError, ValueError):
        return None  # the bundle is gone (a container being removed): say nothing rather than guess
    gid = user.get("gid", 0)
    groups = list(dict.fromkeys([gid, *user.get("additionalGids", [])]))
    return cri.ContainerUser(linux=cri.LinuxContainerUser(uid=user.get("uid", 0), gid=gid,
                                                          supplemental_groups=groups))


def _checkpoint_info(last: CheckpointFacts | None) -> dict:
    if last is None:
        return {"checkpointedAt": "", "checkpointLocation": "", "lastCheckpoint": {}}
    return {"checkpointedAt": _rfc3339(last.time_ns), "checkpointLocation": last.location,
            "lastCheckpoint": last.figures()}


def _restore_info(record) -> dict:
    origin, restored = record.metadata.restore, record.status.restored
    if origin is None:
        return {}
    return {
        "restored": restored is not None,
        "restoredFrom": origin.source,
        "restoredCheckpointTime": _rfc3339(origin.checkpoint_time_ns) if origin.checkpoint_time_ns else "",
        # "established": connections kept; "close": closed at restore (listeners kept); "none": there were none.
        "restoreTcp": restored.tcp if restored else "",
        "baseImage": restored.base_image_id if restored else "",
        "restorePhasesMs": dict(restored.phases_ms) if restored else {},
    }


def _rfc3339(ns: int) -> str:
    seconds, frac = divmod(ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:09d}Z"


def list_containers(rt: Runtime, request) -> "cri.ListContainersResponse":
    f = request.filter if request.HasField("filter") else None
    out = []
    for record in rt.containers.all():
        if f is not None:
            if f.id and not record.id.startswith(f.id):
                continue
            if f.pod_sandbox_id and not record.sandbox_id.startswith(f.pod_sandbox_id):
                continue
            if f.HasField("state") and convert.CONTAINER_STATE[record.state] != f.state.state:
                continue
        config = rt.containers.config_of(record)
        if f is not None and not convert.labels_match(f.label_selector, config.labels):
            continue
        out.append(convert.container(record, config))
    return cri.ListContainersResponse(containers=out)
