"""GetContainerEvents: a stream of created/started/stopped/deleted events, with the statuses after each."""
from __future__ import annotations

import queue

from cri_api import api_pb2 as cri
from pyshim.server import convert
from pyshim.server.runtime import Runtime

_EVENT_TYPE = {0: cri.CONTAINER_CREATED_EVENT, 1: cri.CONTAINER_STARTED_EVENT,
               2: cri.CONTAINER_STOPPED_EVENT, 3: cri.CONTAINER_DELETED_EVENT}


def get_container_events(rt: Runtime, request, is_active):
    subscription = rt.events.subscribe()
    try:
        while is_active():
            try:
                event = subscription.get(timeout=0.5)
            except queue.Empty:
                continue
            yield _response(rt, event)
    finally:
        rt.events.unsubscribe(subscription)


def _response(rt: Runtime, event) -> "cri.ContainerEventResponse":
    response = cri.ContainerEventResponse(container_id=event.container_id,
                                          container_event_type=_EVENT_TYPE[int(event.type)],
                                          created_at=event.created_at_ns)
    sandbox = rt.sandboxes.find(event.sandbox_id)
    if sandbox is not None:
        response.pod_sandbox_status.CopyFrom(convert.pod_sandbox_status(sandbox, rt.sandboxes.config_of(sandbox)))
        for record in rt.containers.in_sandbox(sandbox.id):
            response.containers_statuses.append(convert.container_status(record, rt.containers.config_of(record)))
    return response
