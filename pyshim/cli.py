"""The `pyshim` command: the daemon, image import, and a small CRI client for people and tests."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import grpc


def _load_message(path: str, message_type):
    """A crictl-style JSON config file (snake_case or camelCase field names) into a CRI message."""
    from google.protobuf import json_format

    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return json_format.Parse(text, message_type(), ignore_unknown_fields=False)


def _print_message(message) -> None:
    from google.protobuf import json_format

    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def _short(identifier: str) -> str:
    return identifier[:13]


def _age(ns: int) -> str:
    seconds = max(0, time.time() - ns / 1e9)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


# ---- daemon-side commands -------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from pyshim.config import load_config
    from pyshim.daemon import serve
    from pyshim.log import setup_logging

    config = load_config(args.config, {"socket": args.socket, "root": args.root, "state_dir": args.state_dir,
                                       "log_level": args.log_level})
    setup_logging(config.log_level)
    serve(config)
    return 0


def cmd_config(args) -> int:
    from pyshim.config import default_config_toml

    print(default_config_toml(), end="")
    return 0


def cmd_image_import(args) -> int:
    from oci.layout import import_oci_archive
    from oci.store import ImageStore
    from pyshim.config import load_config

    config = load_config(args.config, {"root": args.root})
    store = ImageStore(config.root_path / "images")
    for record in import_oci_archive(store, Path(args.archive), tag=args.tag):
        print(f"{record.id} {' '.join(record.repo_tags)}")
    return 0


class _CommandFailed(Exception):
    """A one-line message for stderr; the command exits 1."""


def _local_image_store(args, private_tmp: bool = False):
    """The daemon's image store (its root from --config/--root), opened beside a running daemon."""
    from oci.store import ImageStore
    from pyshim.config import load_config

    config = load_config(args.config, {"root": args.root})
    return config, ImageStore(config.root_path / "images", private_tmp=private_tmp)


def _failure_message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def _one_line_errors(func):
    """Report the errors a user can act on as `pyshim <command>: <message>`, exit code 1."""
    def run(args) -> int:
        from criu_glue.errors import ArchiveError
        from oci.errors import ImageError
        from pyshim.errors import CRIError

        try:
            return func(args)
        except (_CommandFailed, ArchiveError, ImageError, CRIError, OSError, ValueError) as exc:
            name = " ".join(filter(None, (args.command, getattr(args, "checkpoint_image_command", None))))
            print(f"pyshim {name}: {_failure_message(exc)}".replace("\n", " "), file=sys.stderr)
            return 1
    return run


@_one_line_errors
def cmd_checkpoint_image_build(args) -> int:
    """Turn a checkpoint archive into a checkpoint image in the daemon's local store."""
    from criu_glue.checkpoint_image import build_checkpoint_image, checkpoint_name_of

    archive = Path(args.archive)
    if not archive.is_file():
        raise _CommandFailed(f"checkpoint archive {archive} does not exist or is not a file")
    _, store = _local_image_store(args)
    record = build_checkpoint_image(store, archive, args.tag, compression=args.compression)
    print(f"{record.id} {' '.join(record.repo_tags)} (checkpoint of container "
          f"{checkpoint_name_of(record)!r}, layer {record.layers[0].size} bytes)")
    return 0


@_one_line_errors
def cmd_checkpoint_image_receive(args) -> int:
    """A checkpoint archive on stdin (`pyshim migrate --direct` pipes it here) into the local store."""
    # --stdin-frames: a private tmp, whose files the next opener of the store removes if this receiver is
    # killed; the one-shot form journals its partial files for the daemon's recovery instead.
    config, store = _local_image_store(args, private_tmp=args.stdin_frames)
    try:
        return _receive(args, config, store)
    finally:
        store.close()


def _receive(args, config, store) -> int:
    from criu_glue.archive import ArchiveDigest
    from pyshim.internal.image_receives import receive
    from pyshim.internal.intents import IntentJournal

    if args.check:  # migrate's preflight: this node's store can be opened and written
        store.scratch_dir("receive-check-").rmdir()
        print("ready")
        return 0
    stdin = sys.stdin.buffer
    if args.stdin_frames:  # unbuffered: the CRIU images go from the pipe or socket to their files by splice(2)
        return _receive_streamed(store, stdin.raw)
    if args.stdin_header:  # started early by `migrate --direct`: the figures come first, as one JSON line
        try:
            header = json.loads(stdin.readline(4096) or b"null")
        except ValueError as exc:
            raise _CommandFailed(f"the header line on stdin is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise _CommandFailed("no header line on stdin (the sender gave up before the archive)")
        args.tag, args.digest, args.diff_id, args.size = (header.get("tag"), header.get("digest"),
                                                          header.get("diffId"), header.get("size"))
    if not (isinstance(args.tag, str) and args.tag and args.digest and isinstance(args.size, int)):
        raise _CommandFailed("receive needs --tag, --digest and --size (or --stdin-frames, --stdin-header, "
                             "or --check)")
    written = ArchiveDigest.from_json({"digest": args.digest, "diffId": args.diff_id or args.digest, "size": args.size})
    if written is None:
        raise _CommandFailed(f"--digest/--diff-id {args.digest!r}/{args.diff_id!r} are not sha256 digests, "
                             "or --size is negative")
    # Journaled where the daemon's recovery reads: a receiver killed mid-stream leaves nothing it keeps.
    record = receive(store, IntentJournal(config.root_path / "state" / "intents"), stdin, args.tag, written,
                     _receive_limits(store))
    print(f"{record.id} {' '.join(record.repo_tags)}")
    return 0


def _receive_streamed(store, stdin) -> int:
    """`receive --stdin-frames` (migrate --direct): the archive framed while the source writes it. The
    line `ready` says the store is open; `stored ID TAG PHASES` that the image is usable (the move's
    restore may start); the blob is completed and synced once stdin ends, and the exit status says
    whether that worked."""
    from criu_glue.checkpoint_receive import complete_received_blob, receive_streamed_checkpoint_image

    # Stopped (the move cancelled, ssh hung up): unwind, so that nothing partial is left in the store.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    print("ready", flush=True)  # the store is open (a private tmp made in it): migrate may freeze the container
    received = receive_streamed_checkpoint_image(store, stdin, _receive_limits(store))
    # One line: `stored ID TAG {phases in ms}` (the sender reports the phases with the move's).
    print(f"stored {received.record.id} {received.record.repo_tags[0]} {json.dumps(received.phases_ms)}", flush=True)
    # The sender ends the stream once the container runs (or it gave up): the blob is completed and
    # synced only then, so that this work does not compete with the restore for the node's CPUs.
    while stdin.read(1 << 16):
        pass
    complete_received_blob(store, received)
    return 0


def _exit_on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def _receive_limits(store):
    from criu_glue.limits import Limits

    stat = os.statvfs(store.root)
    return Limits(max_total_bytes=min(Limits().max_total_bytes, stat.f_bavail * stat.f_frsize))


@_one_line_errors
def cmd_checkpoint_image_push(args) -> int:
    """Push a checkpoint image from the local store to the registry its name points at."""
    from criu_glue.checkpoint_image import is_checkpoint_image
    from oci.reference import Reference
    from oci.registry import RegistryClient

    config, store = _local_image_store(args)
    record = store.get(args.image)
    if record is None:
        raise _CommandFailed(f"no image {args.image} in the local store at {store.root} "
                             "(build it with `pyshim checkpoint-image build`)")
    if not is_checkpoint_image(record):
        raise _CommandFailed(f"image {args.image} is not a checkpoint image (it has none of the "
                             "checkpoint-name annotations)")
    target = Reference.parse(args.image)
    if target.digest:
        raise _CommandFailed(f"push needs a NAME[:TAG] to push to, not the digest reference {args.image}")
    insecure = list(config.images.insecure_registries)
    if args.insecure:
        insecure.append(target.registry)
    client = RegistryClient(insecure_registries=tuple(insecure), timeout=config.images.pull_timeout)
    digest = client.push(store, record, str(target), _push_credentials(args))
    # Remember where it went, as a pull would: kubelet then sees the repo digest in ImageStatus.
    store.add_image(store.manifest_bytes(record), store.config_bytes(record), (),
                    [f"{target.name}@{digest}"])
    print(f"{target.name}@{digest}")
    return 0


def _push_credentials(args):
    from oci.registry import Credentials

    username = password = ""
    if args.creds:
        username, sep, password = args.creds.partition(":")
        if not sep:
            raise _CommandFailed("--creds takes USER:PASSWORD (or use --username with --password-stdin)")
    if args.username:
        username = args.username
    if args.password_stdin:
        if not username:
            raise _CommandFailed("--password-stdin needs --username")
        password = sys.stdin.readline().rstrip("\r\n")
    if not any((username, password, args.identity_token, args.registry_token)):
        return None
    return Credentials(username=username, password=password, identity_token=args.identity_token or "",
                       registry_token=args.registry_token or "")


# ---- client commands ------------------------------------------------------------------------------

def _client(args):
    from pyshim.client import Client

    return Client(args.endpoint, timeout=args.timeout)


def cmd_version(args) -> int:
    with _client(args) as c:
        v = c.version()
        print(f"Version:  {v.version}\nRuntimeName:  {v.runtime_name}\nRuntimeVersion:  {v.runtime_version}\n"
              f"RuntimeApiVersion:  {v.runtime_api_version}")
    return 0


def cmd_runp(args) -> int:
    from cri_api import api_pb2 as cri

    with _client(args) as c:
        print(c.run_pod(_load_message(args.pod_config, cri.PodSandboxConfig)))
    return 0


def cmd_create(args) -> int:
    from cri_api import api_pb2 as cri

    with _client(args) as c:
        print(c.create(args.pod_id, _load_message(args.container_config, cri.ContainerConfig),
                       _load_message(args.pod_config, cri.PodSandboxConfig)))
    return 0


def cmd_run(args) -> int:
    """runp + pull if needed + create + start, as `crictl run` does."""
    from cri_api import api_pb2 as cri

    pod_config = _load_message(args.pod_config, cri.PodSandboxConfig)
    config = _load_message(args.container_config, cri.ContainerConfig)
    with _client(args) as c:
        pod_id = c.run_pod(pod_config)
        container_id = c.create(pod_id, config, pod_config)
        c.start(container_id)
        print(container_id)
    return 0


def _each(args, action) -> int:
    with _client(args) as c:
        for identifier in args.ids:
            action(c, identifier)
            print(identifier)
    return 0


def cmd_start(args) -> int:
    return _each(args, lambda c, i: c.start(i))


def cmd_stop(args) -> int:
    return _each(args, lambda c, i: c.stop(i, args.grace))


def cmd_rm(args) -> int:
    return _each(args, lambda c, i: c.remove(i))


def cmd_stopp(args) -> int:
    return _each(args, lambda c, i: c.stop_pod(i))


def cmd_rmp(args) -> int:
    return _each(args, lambda c, i: c.remove_pod(i))


def cmd_pods(args) -> int:
    from cri_api import api_pb2 as cri

    with _client(args) as c:
        pods = c.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=c.timeout).items
    print(f"{'POD ID':<15}{'CREATED':<14}{'STATE':<12}{'NAME':<24}{'NAMESPACE':<16}ATTEMPT")
    for p in sorted(pods, key=lambda p: -p.created_at):
        print(f"{_short(p.id):<15}{_age(p.created_at):<14}{cri.PodSandboxState.Name(p.state).replace('SANDBOX_', ''):<12}"
              f"{p.metadata.name:<24}{p.metadata.namespace:<16}{p.metadata.attempt}")
    return 0


def cmd_ps(args) -> int:
    from cri_api import api_pb2 as cri

    with _client(args) as c:
        containers = c.runtime.ListContainers(cri.ListContainersRequest(), timeout=c.timeout).containers
    print(f"{'CONTAINER':<15}{'IMAGE':<32}{'CREATED':<14}{'STATE':<10}{'NAME':<20}{'ATTEMPT':<9}POD ID")
    for ctr in sorted(containers, key=lambda x: -x.created_at):
        if not args.all and ctr.state != cri.CONTAINER_RUNNING:
            continue
        print(f"{_short(ctr.id):<15}{ctr.image.image[:31]:<32}{_age(ctr.created_at):<14}"
              f"{cri.ContainerState.Name(ctr.state).replace('CONTAINER_', ''):<10}{ctr.metadata.name:<20}"
              f"{ctr.metadata.attempt:<9}{_short(ctr.pod_sandbox_id)}")
    return 0


def cmd_inspect(args) -> int:
    with _client(args) as c:
        _print_message(c.status(args.id, verbose=True))
    return 0


def cmd_inspectp(args) -> int:
    with _client(args) as c:
        _print_message(c.pod_status(args.id, verbose=True))
    return 0


def cmd_logs(args) -> int:
    """Print a container's log without the CRI prefixes, joining partial lines, as `crictl logs` does."""
    from pyshim.internal.cri_log import read_log

    with _client(args) as c:
        path = c.status(args.id).status.log_path
    if not path:
        print(f"container {args.id} has no log path", file=sys.stderr)
        return 1
    for entry in read_log(Path(path)):
        stream = sys.stdout if entry.stream == "stdout" else sys.stderr
        stream.write(entry.text)
    return 0


def cmd_exec(args) -> int:
    with _client(args) as c:
        result = c.exec_sync(args.id, args.cmd, args.exec_timeout)
    sys.stdout.buffer.write(result.stdout)
    sys.stderr.buffer.write(result.stderr)
    return result.exit_code


def cmd_pull(args) -> int:
    with _client(args) as c:
        print(f"Image is up to date for {c.pull(args.image)}")
    return 0


def cmd_images(args) -> int:
    from cri_api import api_pb2 as cri

    with _client(args) as c:
        images = c.images.ListImages(cri.ListImagesRequest(), timeout=c.timeout).images
    print(f"{'IMAGE':<48}{'IMAGE ID':<15}SIZE")
    for image in images:
        for tag in image.repo_tags or ["<none>"]:
            print(f"{tag:<48}{image.id.removeprefix('sha256:')[:13]:<15}{image.size / 1e6:.1f}MB")
    return 0


def cmd_rmi(args) -> int:
    from cri_api import api_pb2 as cri

    with _client(args) as c:
        for image in args.images:
            c.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image)), timeout=c.timeout)
            print(f"Deleted: {image}")
    return 0


def cmd_stats(args) -> int:
    from cri_api import api_pb2 as cri

    with _client(args) as c:
        stats = c.runtime.ListContainerStats(cri.ListContainerStatsRequest(), timeout=c.timeout).stats
    print(f"{'CONTAINER':<15}{'NAME':<20}{'CPU ns':<16}{'MEM':<12}{'DISK':<12}INODES")
    for s in stats:
        print(f"{_short(s.attributes.id):<15}{s.attributes.metadata.name:<20}{s.cpu.usage_core_nano_seconds.value:<16}"
              f"{s.memory.working_set_bytes.value / 1e6:.1f}MB{'':<6}{s.writable_layer.used_bytes.value / 1e3:.0f}kB"
              f"{'':<7}{s.writable_layer.inodes_used.value}")
    return 0


def cmd_checkpoint(args) -> int:
    """Checkpoint a running container into an archive; it keeps running (like `crictl checkpoint --export`)."""
    from cri_api import api_pb2 as cri

    location = str(Path(args.export).absolute())
    with _client(args) as c:
        c.runtime.CheckpointContainer(cri.CheckpointContainerRequest(
            container_id=args.id, location=location, timeout=args.checkpoint_timeout),
            timeout=max(c.timeout, args.checkpoint_timeout + 5))
    print(location)
    return 0


def cmd_checkpointp(args) -> int:
    """CheckpointPod: the pod's running containers (or --container ones) at one instant into DIR
    (like the `crictl checkpointp` proposed upstream). DIR is created if missing; it must be empty."""
    from cri_api import api_pb2 as cri

    out = Path(args.export).absolute()
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    options = dict(o.split("=", 1) for o in args.option or [])
    with _client(args) as c:
        ids = args.container or [ctr.id for ctr in c.runtime.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(pod_sandbox_id=args.pod, state=cri.ContainerStateValue(
                state=cri.CONTAINER_RUNNING))), timeout=c.timeout).containers]
        if not ids:
            print(f"pyshim checkpointp: pod {args.pod} has no running container", file=sys.stderr)
            return 1
        c.checkpoint_pod(args.pod, str(out), ids, options)
    print(out)
    return 0


def cmd_restorep(args) -> int:
    """RestorePod, then StartContainer for each returned container (what the kubelet does). Container
    configs default to the checkpointed ones; --container-config NAME=FILE replaces one."""
    from google.protobuf import json_format

    from cri_api import api_pb2 as cri
    from criu_glue import pod_checkpoint as podfmt

    checkpoint = Path(args.checkpoint).absolute()
    manifest = podfmt.read_manifest(checkpoint)
    given = {}
    for item in args.container_config or []:
        name, _, path = item.partition("=")
        if not path:
            print(f"pyshim restorep: --container-config wants NAME=FILE, not {item!r}", file=sys.stderr)
            return 2
        given[name] = _load_message(path, cri.ContainerConfig)
    configs = []
    for entry in manifest.containers:
        config = given.pop(entry.name, None)
        if config is None:
            config = json_format.ParseDict(entry.config, cri.ContainerConfig(), ignore_unknown_fields=True)
        configs.append(config)
    configs.extend(given.values())  # names not in the checkpoint: the daemon says so
    with _client(args) as c:
        response = c.restore_pod(str(checkpoint), _load_message(args.config, cri.PodSandboxConfig), configs,
                                 args.runtime_handler)
        print(response.pod_sandbox_id)
        for restored in response.restored_containers:
            if not args.no_start:
                c.start(restored.container_id)
            print(f"{restored.name}\t{restored.container_id}")
    return 0


def cmd_inspect_checkpoint(args) -> int:
    """Show a checkpoint archive of any engine, as `checkpointctl show`/`inspect` do; a pod checkpoint
    directory is shown as its manifest's summary followed by each container part."""
    from criu_glue.inspect import main as inspect_main
    from criu_glue import pod_checkpoint as podfmt

    expanded = []
    for arg in args.args:
        if arg.startswith("-") or not podfmt.is_pod_checkpoint(Path(arg)):
            expanded.append(arg)
            continue
        manifest = podfmt.read_manifest(Path(arg))
        if "--json" not in args.args:
            print(_pod_checkpoint_summary(Path(arg), manifest))
        expanded.extend(str(Path(arg) / c.part) for c in manifest.containers)
    return inspect_main(expanded)


def _pod_checkpoint_summary(path: Path, manifest) -> str:
    from criu_glue.archive_format import format_rfc3339_ns

    meta = manifest.pod_config.get("metadata", {})
    lines = [f"Pod checkpoint {path} (format {manifest.version}, engine {manifest.engine})",
             f"  Pod:          {meta.get('namespace', '')}/{meta.get('name', '')} ({manifest.pod_id[:12]})",
             f"  Checkpointed: {format_rfc3339_ns(manifest.checkpointed_time_ns)}",
             f"  Pod IPs:      {', '.join(manifest.pod_ips) or '-'}",
             f"  TCP policy:   {manifest.tcp}",
             "  Containers:"]
    for c in manifest.containers:
        loopback = sum(1 for t in c.tcp_connections if t.loopback)
        lines.append(f"    {c.name:<20} {c.id[:12]}  {c.part}  tcp: {len(c.tcp_connections)} "
                     f"({loopback} on the pod's loopback)")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyshim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the CRI daemon")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--socket", help="unix socket to serve on (default /run/pyshim/pyshim.sock)")
    serve.add_argument("--root", help="persistent state (default /var/lib/pyshim)")
    serve.add_argument("--state-dir", help="runtime state (default /run/pyshim)")
    serve.add_argument("--log-level", help="debug, info, warning or error")
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("config", help="print the built-in default configuration as TOML").set_defaults(func=cmd_config)

    image = sub.add_parser("image", help="local image operations (no daemon needed)")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    imp = image_sub.add_parser("import", help="import an OCI image-layout archive into the image store")
    imp.add_argument("archive")
    imp.add_argument("--tag", help="name the imported image (when the archive has no ref name)")
    imp.add_argument("--config")
    imp.add_argument("--root")
    imp.set_defaults(func=cmd_image_import)

    cpi = sub.add_parser(
        "checkpoint-image", help="checkpoint images: build one from an archive, push it (no daemon needed)",
        description="A checkpoint image is an OCI image whose single layer is a checkpoint archive, marked by "
                    "the CRI-O, checkpointctl/containerd and Podman checkpoint annotations. Kubernetes restores a "
                    "container by running a pod whose image is one. These commands work on the daemon's local "
                    "image store (--root, as the daemon's); a running daemon sees the result at once.")
    cpi_sub = cpi.add_subparsers(dest="checkpoint_image_command", required=True)
    build = cpi_sub.add_parser(
        "build", help="turn a checkpoint archive into a checkpoint image in the local store",
        description="Validate ARCHIVE (a checkpoint archive of pyshim, CRI-O, Podman or containerd: plain, gzip "
                    "or zstd tar) and add it to the local image store as a one-layer checkpoint image named by "
                    "--tag. The name comes only from --tag, never from the archive.")
    build.add_argument("archive", metavar="ARCHIVE", help="the checkpoint archive (e.g. from `pyshim checkpoint --export`)")
    build.add_argument("--tag", "-t", required=True, metavar="NAME[:TAG]",
                       help="name of the image, e.g. registry.example:5000/checkpoints/web:v1 (tag defaults to latest)")
    build.add_argument("--compression", choices=("keep", "none", "gzip", "zstd"), default="keep",
                       help="layer compression: keep the archive's own bytes (default) or recompress")
    build.add_argument("--root", help="the daemon's root (default from --config, else /var/lib/pyshim)")
    build.add_argument("--config", help="the daemon's TOML configuration file")
    build.set_defaults(func=cmd_checkpoint_image_build)
    push = cpi_sub.add_parser(
        "push", help="push a checkpoint image from the local store to its registry",
        description="Upload IMAGE (blobs the registry lacks, then the manifest) to the registry and repository "
                    "its name says. Loopback registries use plain HTTP; others HTTPS.")
    push.add_argument("image", metavar="NAME[:TAG]", help="the local checkpoint image, and where to push it")
    push.add_argument("--insecure", "--plain-http", action="store_true",
                      help="for this registry, accept HTTPS without certificate checks and fall back to plain HTTP")
    push.add_argument("--creds", metavar="USER:PASSWORD", help="registry credentials (Basic or token auth)")
    push.add_argument("--username", help="registry user name (with --password-stdin)")
    push.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    push.add_argument("--identity-token", help="OAuth2 refresh token for the registry's token service")
    push.add_argument("--registry-token", help="bearer token to present to the registry as is")
    push.add_argument("--root", help="the daemon's root (default from --config, else /var/lib/pyshim)")
    push.add_argument("--config", help="the daemon's TOML configuration file (its insecure_registries apply)")
    push.set_defaults(func=cmd_checkpoint_image_push)
    receive = cpi_sub.add_parser(
        "receive", help="store a checkpoint archive read from stdin as a checkpoint image (migrate --direct)",
        description="Read a plain-tar checkpoint archive from stdin, check it against --digest and --size, and "
                    "add it to the local store as the checkpoint image --tag, its CRIU images unpacked in the same "
                    "pass. With --stdin-frames (what `pyshim migrate --direct` runs on the target node) the archive "
                    "comes framed while the source writes it, its tag first and its digest and size last; it answers "
                    "`ready` once the store is open and `stored ID TAG PHASES` once the image is usable, and its layer blob is completed and synced "
                    "once stdin ends. Nothing is kept on any error.")
    receive.add_argument("--tag", "-t", metavar="NAME[:TAG]", help="name of the image")
    receive.add_argument("--digest", metavar="sha256:HEX", help="the archive's digest, as its writer computed it")
    receive.add_argument("--size", type=int, help="the archive's size in bytes")
    receive.add_argument("--diff-id", metavar="sha256:HEX",
                         help="a compressed archive's uncompressed digest (default: --digest, a plain tar)")
    receive.add_argument("--check", action="store_true", help="only check that the store can be written")
    receive.add_argument("--stdin-header", action="store_true",
                         help="read tag, digest, diffId and size as one JSON line on stdin before the archive")
    receive.add_argument("--stdin-frames", action="store_true",
                         help="read the archive framed as it is written, its digest and size last "
                              "(criu_glue/archive_frames.py; what `migrate --direct` sends)")
    receive.add_argument("--root", help="the daemon's root (default from --config, else /var/lib/pyshim)")
    receive.add_argument("--config", help="the daemon's TOML configuration file")
    receive.set_defaults(func=cmd_checkpoint_image_receive)

    def client_command(name, func, help_text):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--endpoint", "-r", help="CRI endpoint (default $PYSHIM_ENDPOINT or unix:///run/pyshim/pyshim.sock)")
        p.add_argument("--timeout", type=float, default=120, help="seconds per call")
        p.set_defaults(func=func)
        return p

    client_command("version", cmd_version, "runtime version")
    client_command("runp", cmd_runp, "run a pod from a JSON pod config").add_argument("pod_config")
    p = client_command("create", cmd_create, "create a container in a pod")
    p.add_argument("pod_id"), p.add_argument("container_config"), p.add_argument("pod_config")
    p = client_command("run", cmd_run, "run a pod and a container in it")
    p.add_argument("container_config"), p.add_argument("pod_config")
    for name, func, help_text in (("start", cmd_start, "start containers"), ("rm", cmd_rm, "remove containers"),
                                  ("stopp", cmd_stopp, "stop pods"), ("rmp", cmd_rmp, "remove pods")):
        client_command(name, func, help_text).add_argument("ids", nargs="+")
    p = client_command("stop", cmd_stop, "stop containers")
    p.add_argument("ids", nargs="+")
    p.add_argument("--grace", type=int, default=10, help="seconds before SIGKILL")
    client_command("pods", cmd_pods, "list pods")
    client_command("ps", cmd_ps, "list containers").add_argument("-a", "--all", action="store_true")
    client_command("inspect", cmd_inspect, "container status").add_argument("id")
    client_command("inspectp", cmd_inspectp, "pod status").add_argument("id")
    client_command("logs", cmd_logs, "print a container's log").add_argument("id")
    p = client_command("exec", cmd_exec, "run a command in a container (ExecSync)")
    p.add_argument("id")
    p.add_argument("--exec-timeout", type=int, default=0)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    from pyshim.cli_streaming import register as register_streaming_commands
    register_streaming_commands(sub, client_command, p)
    client_command("pull", cmd_pull, "pull an image").add_argument("image")
    client_command("images", cmd_images, "list images")
    client_command("rmi", cmd_rmi, "remove images").add_argument("images", nargs="+")
    client_command("stats", cmd_stats, "container usage")
    p = client_command("checkpoint", cmd_checkpoint, "checkpoint a running container to an archive (it keeps running)")
    p.add_argument("id")
    p.add_argument("--export", required=True, help="archive to write (a tar, as kubelet expects)")
    p.add_argument("--checkpoint-timeout", type=int, default=300, help="seconds CRIU may take")
    p = client_command("checkpointp", cmd_checkpointp,
                       "checkpoint a pod's containers at one instant into a directory (they keep running)")
    p.add_argument("pod", metavar="POD")
    p.add_argument("--export", required=True, metavar="DIR", help="empty (or missing) directory to write")
    p.add_argument("--container", action="append", metavar="ID",
                   help="a container to include (repeatable; default every running container of the pod)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="CheckpointPod option: compression=none|gzip|zstd, tcp=auto|established|close")
    p = client_command("restorep", cmd_restorep,
                       "restore a pod checkpoint into a new pod and start its containers")
    p.add_argument("checkpoint", metavar="DIR")
    p.add_argument("--config", required=True, metavar="POD.json", help="the new pod's PodSandboxConfig (JSON)")
    p.add_argument("--container-config", action="append", metavar="NAME=FILE",
                   help="ContainerConfig (JSON) for container NAME (default: the checkpointed one)")
    p.add_argument("--runtime-handler", default="")
    p.add_argument("--no-start", action="store_true", help="leave the restored containers CREATED")
    p = sub.add_parser("inspect-checkpoint", help="show checkpoint archives (pyshim, CRI-O, Podman, containerd) "
                                                  "and pod checkpoint directories: "
                                                  "PATH... [--ps] [--files] [--mem] [--all] [--json]")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_inspect_checkpoint)

    from pyshim.migration.commands import add_commands as add_migration_commands
    add_migration_commands(sub)

    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "cmd", None) and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    try:
        return args.func(args)
    except grpc.RpcError as e:
        print(f"pyshim {args.command}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
