"""CheckpointContainer with `pyshim-checkpoint-mode: lazy|lazy-finish|lazy-resume` (`pyshim migrate --lazy`).

"lazy" needs `pyshim-page-server: ADDRESS:PORT` (the address the target reaches this node at; CRIU's RPC
takes only the port and listens on every address of the node's network namespace). It answers once the
archive at `location` holds everything but the memory and CRIU serves the memory; the container stays
frozen. "lazy-finish" (the target has every page) ends it, reason Checkpointed; "lazy-resume" thaws it.
pyshim/checkpoint_restore/lazy_checkpoint.py has the whole story.
"""
from __future__ import annotations

import time
from pathlib import Path

from cri_api import api_pb2 as cri
from pyshim.annotations import PAGE_SERVER_KEY
from pyshim.checkpoint_restore.checkpoint import CheckpointResult, validate_location
from pyshim.checkpoint_restore.lazy_checkpoint import parse_page_server
from pyshim.checkpoint_restore.records import CheckpointFacts
from pyshim.errors import InvalidArgument
from pyshim.internal import netns
from pyshim.server.runtime import Runtime


def lazy_checkpoint(rt: Runtime, request, mode: str, deadline: float, durable: bool,
                    metadata: dict[str, str]) -> "cri.CheckpointContainerResponse":
    from pyshim.server.container_checkpoint import archive_members  # (that module dispatches here)

    record = rt.containers.get(request.container_id)
    sandbox = rt.sandboxes.find(record.sandbox_id)
    netns_path = str(netns.netns_path(sandbox.netns_name)) if sandbox and sandbox.netns_name else ""
    if mode == "lazy-resume":
        rt.lazy_checkpoints.resume(record)
        return cri.CheckpointContainerResponse()
    if mode == "lazy-finish":
        rt.lazy_checkpoints.finish(record, netns_path, max(0.1, deadline - time.monotonic()))
        # The figures of the "lazy" call, now of a checkpoint that stopped the container (reason Checkpointed).
        last = record.last_checkpoint or CheckpointFacts(location="", time_ns=0)
        rt.containers.note_checkpoint(record.id, CheckpointResult(
            Path(last.location), last.frozen_ms / 1000, last.total_ms / 1000, last.archive_bytes,
            last.tcp_established, True, dict(last.phases_ms), last.archive))
        return cri.CheckpointContainerResponse()
    if PAGE_SERVER_KEY not in metadata:
        raise InvalidArgument(f"a lazy checkpoint needs gRPC metadata {PAGE_SERVER_KEY}: ADDRESS:PORT where the "
                              "target node reaches this node's page server")
    page_server = parse_page_server(metadata[PAGE_SERVER_KEY])
    rt.lazy_checkpoints.check_host()
    rt.restores.refuse_while_pages_arrive(record)
    location = validate_location(request.location)
    result = rt.lazy_checkpoints.start(record, archive_members(rt, record, sandbox), location, deadline,
                                       page_server, durable, netns_path)
    rt.containers.note_checkpoint(record.id, result)
    return cri.CheckpointContainerResponse()
