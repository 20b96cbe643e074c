"""ContainerStatus and ListContainers."""
from __future__ import annotations

import json
import time

from google.protobuf import json_format

from cri_api import api_pb2 as cri
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
            "checkpointedAt": _rfc3339(record.checkpointed_at) if record.checkpointed_at else "",
            "checkpointLocation": record.checkpoint_location,
            "lastCheckpoint": record.last_checkpoint,
            # What the container was created with, as containerd shows it: tools that move a
            # container (pyshim migrate, host restart) recreate it from this.
            "config": json_format.MessageToDict(config),
            **_restore_info(record),
            **rt.restores.lazy_status(record),  # post-copy restores: whether every page has arrived
        })
    return cri.ContainerStatusResponse(status=convert.container_status(record, config), info=info)


def _restore_info(record) -> dict:
    if not record.restore_from:
        return {}
    return {
        "restored": record.restored,
        "restoredFrom": record.restore_from,
        "restoredCheckpointTime": _rfc3339(record.restored_checkpoint_time) if record.restored_checkpoint_time else "",
        # "established": connections kept; "close": closed at restore (listeners kept); "none": there were none.
        "restoreTcp": record.restore_tcp,
        "baseImage": record.base_image_id,
        "restorePhasesMs": record.restore_phases_ms,
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
