"""RestorePod's engine: check a pod checkpoint against the restore request, and keep the pod's
loopback connections whole while its containers come back one StartContainer at a time.

The checkpoint (criu_glue.pod_checkpoint) is untrusted. From its manifest come only the set of
container names, the part each name restores from, the configs the request is compared with, and
the loopback connections to hold; every part is then checked by the container restorer exactly as a
container archive is (Restorer.plan). The new pod and its containers are built from the request.

How the containers of one pod relate at StartContainer. RestorePod returns every container CREATED;
the kubelet starts them one by one, and each StartContainer runs `runc restore` for its container,
which resumes it at once. A connection between two containers over the pod's loopback has both ends
in the checkpoint; if the first container restored sent on it before its peer exists, the kernel
would answer with a reset and the connection would be lost. So RestorePod locks those connections
(iptables DROP of their 4-tuples, both ways, in the new pod's network namespace, chain
PYSHIM-POD-<sandbox>) before returning; packets sent meanwhile are dropped and later retransmitted
by TCP. When the last container of the pod still waiting for its restore has been started (or has
failed to), StartContainer lifts the lock and the connections carry on. A container that is never
started keeps its peers' loopback connections stalled (not broken) until it is, or the pod is removed.

Refused, with a clear error: pods whose containers share a PID namespace (the checkpointed PIDs
would have to be recreated in a namespace whose init is the new pod's infra process, which CRIU
cannot do container by container), and containers that target another container's PID namespace.
"""
from __future__ import annotations

import logging
import subprocess

from google.protobuf import json_format

from cri_api import api_pb2 as cri
from criu_glue import pod_checkpoint as podfmt
from pyshim.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

POD_LOCK_PREFIX = "PYSHIM-POD-"  # not matched by tcp_lock's PYSHIM-LOCK- chains, which restores lift
RUNTIME_HANDLERS = ("", "runc")
KNOWN_OPTIONS: tuple[str, ...] = ()


def check_request_shape(runtime_handler: str, options: dict[str, str], container_configs) -> None:
    if runtime_handler not in RUNTIME_HANDLERS:
        raise InvalidArgument(f"RestorePod: runtime handler {runtime_handler!r} is not configured (only runc, "
                              "or empty for the default)")
    unknown = sorted(set(options) - set(KNOWN_OPTIONS))
    if unknown:
        raise InvalidArgument(f"RestorePod options {unknown} are not supported (pyshim knows none)")
    if not container_configs:
        raise InvalidArgument("RestorePod: container_configs is empty")
    names = [c.metadata.name for c in container_configs]
    if any(not n for n in names):
        raise InvalidArgument("RestorePod: every container config needs a non-empty metadata.name")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidArgument(f"RestorePod: container names {duplicates} appear more than once")


def check_names(manifest: podfmt.PodManifest, container_configs) -> None:
    wanted = {c.metadata.name for c in container_configs}
    have = {c.name for c in manifest.containers}
    if wanted != have:
        missing, extra = sorted(have - wanted), sorted(wanted - have)
        raise InvalidArgument(f"RestorePod: container_configs names must be exactly the checkpoint's "
                              f"{sorted(have)}; missing {missing}, not in the checkpoint {extra}")


def check_namespaces(pod_config, container_configs) -> None:
    """Refuse what cannot be restored container by container (see the module docstring)."""
    if pod_config.linux.security_context.namespace_options.pid == cri.NamespaceMode.POD:
        raise FailedPrecondition("RestorePod: pods whose containers share a PID namespace "
                                 "(shareProcessNamespace) cannot be restored by pyshim: CRIU would have to recreate "
                                 "the checkpointed PIDs inside the new pod's shared namespace")
    for c in container_configs:
        if c.linux.security_context.namespace_options.pid == cri.NamespaceMode.TARGET:
            raise FailedPrecondition(f"RestorePod: container {c.metadata.name!r} targets another container's PID "
                                     "namespace; pyshim cannot restore shared PID namespaces")


def checkpointed_config(entry: podfmt.PodContainer) -> "cri.ContainerConfig":
    config = cri.ContainerConfig()
    try:
        json_format.ParseDict(entry.config, config, ignore_unknown_fields=True)
    except json_format.ParseError as e:
        raise InvalidArgument(f"pod checkpoint: container {entry.name!r} config is malformed: {e}") from None
    return config


def check_matches(name: str, request, checkpointed, same_image) -> None:
    """The request describes the checkpointed process: image, command, args, working dir, env and
    credentials must agree. `same_image(a, b)` says whether two image references are one image."""
    def differ(what: str, want, got) -> FailedPrecondition:
        return FailedPrecondition(f"RestorePod: container {name!r}: {what} {want!r} does not match the "
                                  f"checkpoint's {got!r}")

    req_images = {request.image.image, request.image.user_specified_image} - {""}
    ckpt_images = {checkpointed.image.image, checkpointed.image.user_specified_image} - {""}
    if not (req_images & ckpt_images) and not any(same_image(a, b) for a in req_images for b in ckpt_images):
        raise differ("image", request.image.image, checkpointed.image.image)
    if list(request.command) != list(checkpointed.command):
        raise differ("command", list(request.command), list(checkpointed.command))
    if list(request.args) != list(checkpointed.args):
        raise differ("args", list(request.args), list(checkpointed.args))
    if request.working_dir != checkpointed.working_dir:
        raise differ("working directory", request.working_dir, checkpointed.working_dir)
    if _env(request) != _env(checkpointed):
        changed = sorted(k for k in set(_env(request)) | set(_env(checkpointed))
                         if _env(request).get(k) != _env(checkpointed).get(k))
        raise FailedPrecondition(f"RestorePod: container {name!r}: environment differs from the checkpoint's "
                                 f"in {changed}")
    if _credentials(request) != _credentials(checkpointed):
        raise differ("process credentials", _credentials(request), _credentials(checkpointed))


def _env(config) -> dict[str, str]:
    return {kv.key: kv.value for kv in config.envs}


def _credentials(config) -> tuple:
    sc = config.linux.security_context
    return (sc.run_as_user.value if sc.HasField("run_as_user") else None,
            sc.run_as_group.value if sc.HasField("run_as_group") else None,
            sc.run_as_username, tuple(sc.supplemental_groups))


def tcp_annotation(manifest: podfmt.PodManifest, entry: podfmt.PodContainer) -> str:
    """The per-container TCP decision RestorePod records (restorer.TCP_ANNOTATION), or "" for the
    container restore's own policy: loopback-only connections come back established (both ends are
    restored into the new pod), the `close` option closes all; anything else as a container restore."""
    if manifest.tcp == "close":
        return "close"
    if entry.tcp_connections and entry.loopback_tcp_only:
        return "established"
    return ""


def loopback_connections(manifest: podfmt.PodManifest) -> list[podfmt.TcpConnection]:
    return [c for entry in manifest.containers for c in entry.tcp_connections if c.loopback]


def pod_lock_chain(sandbox_id: str) -> str:
    return POD_LOCK_PREFIX + sandbox_id[:12]


def _in_netns(netns_path: str, argv: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net={netns_path}", "--", *argv], input=stdin, capture_output=True,
                          text=True, timeout=30)


def lock_loopback(netns_path: str, sandbox_id: str, connections: list[podfmt.TcpConnection]) -> None:
    """Drop the packets of the checkpointed loopback connections until every end is restored."""
    chain = pod_lock_chain(sandbox_id)
    for ipv6, tool in ((False, "iptables-restore"), (True, "ip6tables-restore")):
        chosen = [c for c in connections if (":" in c.local) == ipv6]
        if not chosen:
            continue
        lines = ["*filter", f":{chain} - [0:0]"]
        for c in chosen:
            lines.append(f"-A {chain} -p tcp -s {c.local} --sport {c.local_port} -d {c.peer} "
                         f"--dport {c.peer_port} -j DROP")
        lines += [f"-I INPUT -j {chain}", f"-I OUTPUT -j {chain}", "COMMIT", ""]
        proc = _in_netns(netns_path, [tool, "-w", "--noflush"], "\n".join(lines))
        if proc.returncode != 0:
            raise FailedPrecondition(f"RestorePod: cannot hold the pod's loopback connections ({tool}): "
                                     f"{proc.stderr.strip()}")


def unlock_loopback(netns_path: str, sandbox_id: str) -> None:
    chain = pod_lock_chain(sandbox_id)
    for save, tool in (("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")):
        try:
            proc = _in_netns(netns_path, [save, "-t", "filter"])
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("cannot read the pod's firewall to release its loopback lock",
                      extra={"sandbox": sandbox_id, "error": str(e)})
            continue
        if proc.returncode != 0 or f":{chain} " not in proc.stdout:
            continue
        for hook in ("INPUT", "OUTPUT"):
            _in_netns(netns_path, [tool, "-w", "-D", hook, "-j", chain])
        _in_netns(netns_path, [tool, "-w", "-F", chain])
        _in_netns(netns_path, [tool, "-w", "-X", chain])
        log.info("pod loopback connections released", extra={"sandbox": sandbox_id})
