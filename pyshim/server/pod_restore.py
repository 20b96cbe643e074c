"""RestorePod (cri-api v0.37, KEP-5823): a new pod sandbox and CREATED containers from a pod checkpoint.

Validate the request and the checkpoint (pyshim/checkpoint_restore/pod_restore.py, the container restorer's
archive checks for every part), create the sandbox from the request's config, then one container per
config whose restore source is its part of the checkpoint: StartContainer restores each, as for a
container created from an archive. On any error every sandbox and container this call created is
removed before it returns, and if the daemon is killed before it answers, at its next start
(pod_restore_journal.py). The checkpoint is only read.
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cri_api import api_pb2 as cri
from criu_glue import pod_checkpoint as podfmt
from criu_glue.errors import ArchiveError
from pyshim.errors import DeadlineExceeded, InvalidArgument, NotFound
from pyshim.checkpoint_restore import pod_restore as pod_restorer
from pyshim.checkpoint_restore import pod_restore_journal
from pyshim.internal import crashpoints, netns
from pyshim.checkpoint_restore.detection import RestoreSource
from pyshim.checkpoint_restore.restore import TCP_ANNOTATION
from pyshim.internal.phases import PhaseTimer
from pyshim.server.container_lifecycle import _sandbox_context
from pyshim.server.pod_checkpoint import caller_deadline
from pyshim.server.pod_restore_start import hold_part, record_group, release_part
from pyshim.server.runtime import Runtime


def restore_pod(rt: Runtime, request, time_remaining: float | None) -> "cri.RestorePodResponse":
    deadline = caller_deadline(time_remaining, "RestorePod")
    phases = PhaseTimer()
    rt.restorer.check_enabled()
    if not request.HasField("config"):
        raise InvalidArgument("RestorePod: config is missing")
    pod_restorer.check_request_shape(request.runtime_handler, dict(request.options), request.container_configs)
    manifest = _read_checkpoint(request.checkpoint_path)
    pod_restorer.check_names(manifest, request.container_configs)
    pod_restorer.check_namespaces(request.config, request.container_configs)
    configs = []
    for config in request.container_configs:
        entry = manifest.container(config.metadata.name)
        pod_restorer.check_matches(entry.name, config, pod_restorer.checkpointed_config(entry),
                                   lambda a, b: _same_image(rt, a, b))
        configs.append((entry, _with_tcp_decision(config, pod_restorer.tcp_annotation(manifest, entry))))
    checkpoint_dir = Path(request.checkpoint_path)
    # Every part is checked as a container archive is (hostile-archive checks, expected bind mounts),
    # side by side (each reads its own archive's index), and beside the making of the sandbox, which
    # mostly waits for CNI plugins: nothing of the sandbox comes from the checkpoint, and a refused part
    # removes it again before the call answers. From here on everything made is named in an intent
    # first, so that a daemon killed before the answer leaves nothing behind at its next start
    # (pod_restore_journal.py).
    with ThreadPoolExecutor(max_workers=min(len(configs), 4), thread_name_prefix="pod-plan") as pool, \
            pod_restore_journal.track(rt.intents, str(checkpoint_dir), len(configs)) as journaled:
        planned = [pool.submit(_open_part, rt, checkpoint_dir / entry.part, config) for entry, config in configs]
        try:
            sandbox = rt.sandboxes.run(request.config, request.runtime_handler, sandbox_id=journaled.sandbox_id)
            crashpoints.reached(pod_restore_journal.CRASH_SANDBOX_CREATED)
            phases.mark("sandbox")
            parts = [future.result() for future in planned]
            phases.mark("check")
            loopback = pod_restorer.loopback_connections(manifest)
            if loopback and manifest.tcp != "close" and sandbox.netns_name:
                pod_restorer.lock_loopback(str(netns.netns_path(sandbox.netns_name)), sandbox.id, loopback)
                _lock_marker(sandbox).touch(mode=0o600)
            restored = []
            for (entry, config), (checkpoint, closing) in zip(configs, parts):
                context = _sandbox_context(rt, sandbox.id, config)
                record = rt.restores.create(context, config, RestoreSource(checkpoint.plan),
                                            container_id=journaled.next_container_id())
                hold_part(record.id, checkpoint, closing)  # the first StartContainer restores from it
                crashpoints.reached(pod_restore_journal.CRASH_CONTAINER_CREATED)
                restored.append(cri.RestoredContainer(name=entry.name, container_id=record.id))
            # The first StartContainer of any of them restores them all together (pod_restore_start.py).
            record_group(sandbox, [r.container_id for r in restored])
            phases.mark("containers")
            if time.monotonic() >= deadline:
                raise DeadlineExceeded("RestorePod ran out of time; what it created was removed")
            crashpoints.reached(pod_restore_journal.CRASH_CREATED)
        except BaseException as error:
            journaled.undo(rt.containers, rt.sandboxes)
            for container_id in journaled.container_ids:
                release_part(container_id)
            _close_parts(planned)
            refused = _refusal(planned)
            if refused is not None and refused is not error:
                raise refused from None  # the checkpoint's fault says more than the sandbox's
            raise
    rt.log.info("pod restored (containers CREATED)", extra={
        "sandbox": sandbox.id, "checkpoint": str(checkpoint_dir),
        "containers": [r.container_id for r in restored],
        "phases_ms": phases.report()})
    return cri.RestorePodResponse(pod_sandbox_id=sandbox.id, restored_containers=restored)


def after_restore_started(rt: Runtime, sandbox_id: str) -> None:
    """Called by StartContainer after a restore (whatever its outcome): once no container of the pod
    waits for its restore any more, its loopback connections are released."""
    sandbox = rt.sandboxes.find(sandbox_id)
    if sandbox is None or not sandbox.netns_name or not _lock_marker(sandbox).exists():
        return  # not a RestorePod pod holding loopback connections: nothing to do (and no iptables call)
    waiting = [c for c in rt.containers.in_sandbox(sandbox_id) if c.pending_restore and c.state.value == "CREATED"]
    if not waiting:
        pod_restorer.unlock_loopback(str(netns.netns_path(sandbox.netns_name)), sandbox_id)
        _lock_marker(sandbox).unlink(missing_ok=True)


def _open_part(rt: Runtime, path: Path, config):
    """A part, checked as a container archive (Restorer.open) and kept open for its restore: the
    OpenCheckpoint and the ExitStack that closes it."""
    closing = contextlib.ExitStack()
    try:
        return closing.enter_context(rt.restorer.open(path, config, cached=False)), closing
    except BaseException:
        closing.close()
        raise


def _close_parts(planned) -> None:
    for future in planned:
        if future.exception() is None:
            future.result()[1].close()


def _refusal(planned) -> BaseException | None:
    """The first check of a part that failed (waiting for those still running), if any."""
    for future in planned:
        error = future.exception()
        if error is not None:
            return error
    return None


def _lock_marker(sandbox) -> Path:
    """Present while RestorePod holds the pod's loopback connections; in the pod's pin directory,
    which goes with the pod."""
    return Path(sandbox.pin_dir) / "pod-restore-loopback-lock"


def _read_checkpoint(checkpoint_path: str) -> podfmt.PodManifest:
    if not checkpoint_path:
        raise InvalidArgument("RestorePod: checkpoint_path is empty")
    path = Path(checkpoint_path)
    if not path.is_absolute():
        raise InvalidArgument(f"RestorePod: checkpoint_path {checkpoint_path!r} is not absolute")
    if not path.is_dir():
        raise NotFound(f"RestorePod: pod checkpoint {checkpoint_path} not found (want a directory)")
    try:
        return podfmt.read_manifest(path)
    except ArchiveError as e:
        raise InvalidArgument(f"RestorePod: {e}") from None


def _with_tcp_decision(config, decision: str):
    """The request's config, with pyshim's TCP decision for this container unless the caller set one."""
    if not decision or TCP_ANNOTATION in config.annotations:
        return config
    copy = type(config)()
    copy.CopyFrom(config)
    copy.annotations[TCP_ANNOTATION] = decision
    return copy


def _same_image(rt: Runtime, a: str, b: str) -> bool:
    image_a, image_b = rt.images.get(a), rt.images.get(b)
    return image_a is not None and image_b is not None and image_a.id == image_b.id
