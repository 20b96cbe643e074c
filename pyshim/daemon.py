"""`pyshim serve`: wire the adapters and managers together and serve CRI on a unix socket."""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import threading
from concurrent import futures
from pathlib import Path

import grpc

from cri_api import api_pb2_grpc
from oci.registry import RegistryClient
from oci.store import ImageStore
from pyshim.config import Config
from pyshim.errors import InvalidArgument
from criu_glue.checkpoint_cache import CheckpointCache
from criu_glue import kdat_cache
from pyshim.checkpoint_restore.checkpoint import Checkpointer
from pyshim.checkpoint_restore.restore import RestoreEngine, Restorer
from pyshim.internal.cni import CNINetwork, default_conflist, load_conflist
from pyshim.internal.conmon import Conmon
from pyshim.internal.container_manager import ContainerManager
from pyshim.internal.events import EventBus
from pyshim.internal.image_pulls import ImagePuller
from pyshim.internal.intents import IntentJournal
from pyshim.checkpoint_restore.lazy_checkpoint import LazyCheckpoints
from pyshim.checkpoint_restore.pod_checkpoint import PodCheckpointer
from pyshim.internal.recovery import recover
from pyshim.internal.runc import Runc
from pyshim.internal.sandbox_manager import SandboxManager
from pyshim.server import pod_restore_start
from pyshim.server.runtime import Runtime
from pyshim.server.servicer import ImageService, RuntimeService

log = logging.getLogger("pyshim")

# How often exits are noticed without anyone asking (for GetContainerEvents).
EXIT_POLL_SECONDS = 1.0
GRPC_WORKERS = 16


def _version_of(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def _lock_root(root: Path) -> int:
    """One daemon per root: two would fight over the same state."""
    fd = os.open(root / "pyshim.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another pyshim daemon already uses root {root}") from None
    return fd


def _network(config: Config) -> CNINetwork:
    root = config.root_path
    if config.network.conflist:
        conflist = load_conflist(Path(config.network.conflist))
    else:
        conflist = default_conflist(config.network.name, config.network.bridge, config.network.subnet,
                                    root / "cni" / "networks")
    return CNINetwork(conflist, [Path(d) for d in config.network.plugin_dirs], root / "cni" / "cache")


def _prime_criu_kdat(mode: str) -> threading.Thread | None:
    """[checkpoint] criu_kdat_cache: give CRIU its kernel-feature cache where /run is not a tmpfs
    (saves its ~35 ms probe in every dump and restore). In the background: the daemon serves at once,
    and a CRIU run meanwhile probes as before."""
    try:
        if not kdat_cache.wanted(mode):
            return None
    except kdat_cache.KdatError as e:
        raise InvalidArgument(str(e)) from None

    def prime() -> None:
        try:
            primed = kdat_cache.prime()
            log.info("CRIU kernel-feature cache written", extra={"path": str(primed.path), "bytes": primed.size,
                                                               "ms": round(primed.seconds * 1000, 1)})
        except (kdat_cache.KdatError, OSError, subprocess.SubprocessError) as e:
            log.warning("cannot write CRIU's kernel-feature cache; CRIU probes the kernel at every run",
                        extra={"error": str(e)})
    thread = threading.Thread(target=prime, name="criu-kdat", daemon=True)
    thread.start()
    return thread


def build_runtime(config: Config) -> Runtime:
    root, state = config.root_path, config.state_path
    _prime_criu_kdat(config.checkpoint.criu_kdat_cache)
    for d in (root, state):
        d.mkdir(parents=True, exist_ok=True, mode=0o711)
    runc_binary = config.resolved_binary("runtime")
    conmon_binary = config.resolved_binary("conmon")
    runc = Runc(runc_binary, state / "runc")
    conmon = Conmon(conmon_binary, runc_binary, state / "runc", config.log_level)
    events = EventBus()
    images = ImageStore(root / "images")
    journal = IntentJournal(root / "state" / "intents")
    checkpointer = Checkpointer(config.checkpoint, runc, root / "checkpoint-work", intents=journal)
    restorer = Restorer(config.checkpoint, checkpointer.criu, cache=CheckpointCache(images))
    containers = ContainerManager(root, state, runc, conmon, images, events, intents=journal)
    sandboxes = SandboxManager(root, state, _network(config), config.network.netns_prefix, config.cgroup_parent,
                               intents=journal, runc=runc)
    sandboxes.load()
    puller = ImagePuller(RegistryClient(insecure_registries=tuple(config.images.insecure_registries),
                                        timeout=config.images.pull_timeout,
                                        mirrors={r: tuple(h) for r, h in config.images.mirrors.items()}),
                         images, journal)
    containers.load()
    restores = RestoreEngine(containers, restorer, runc, conmon, images, puller, journal,
                             lazy_default=config.checkpoint.lazy_restore)
    containers.on_remove(lambda record: pod_restore_start.release_part(record.id))  # RestorePod's open parts
    pod_checkpointer = PodCheckpointer(checkpointer, runc, journal, root / "checkpoint-work")
    lazy_checkpoints = LazyCheckpoints(checkpointer, runc, journal, root / "lazy-checkpoint-work")
    runtime = Runtime(config=config, sandboxes=sandboxes, containers=containers, images=images,
                      registry=puller, events=events, checkpointer=checkpointer, restorer=restorer,
                      restores=restores,
                      runc_version=_version_of(runc_binary), conmon_version=_version_of(conmon_binary),
                      log=log, pod_checkpointer=pod_checkpointer, lazy_checkpoints=lazy_checkpoints,
                      intents=journal)
    # Before the socket is served: no call may see a half-done operation of the previous daemon.
    recover(runtime, journal)
    return runtime


def _bind(server: grpc.Server, socket_path: Path) -> None:
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    try:
        socket_path.unlink()  # a stale socket from a killed daemon
    except FileNotFoundError:
        pass
    server.add_insecure_port(f"unix://{socket_path}")


def _watch_exits(runtime: Runtime, stop: threading.Event) -> None:
    while not stop.wait(EXIT_POLL_SECONDS):
        try:
            runtime.containers.poll_exits()
        except Exception:  # noqa: BLE001 - the watcher must outlive one bad record
            log.exception("exit watcher failed")


def _start_streaming(config: Config, runtime: Runtime):
    """The server behind the URLs of Exec, Attach and PortForward."""
    from pyshim.internal.streaming_backend import StreamingBackend
    from pyshim.streaming.server import StreamingServer

    backend = StreamingBackend(runtime.containers, runtime.sandboxes,
                               Runc(config.resolved_binary("runtime"), config.state_path / "runc"))
    settings = config.streaming
    streaming = StreamingServer(backend, settings.address, settings.port, settings.token_ttl).start()
    log.info("serving streaming", extra={"url": streaming.base_url})
    return streaming


def serve(config: Config) -> None:
    config.root_path.mkdir(parents=True, exist_ok=True, mode=0o711)
    lock_fd = _lock_root(config.root_path)
    runtime = build_runtime(config)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS),
                         options=[("grpc.max_receive_message_length", 16 * 1024 * 1024),
                                  ("grpc.max_send_message_length", 16 * 1024 * 1024)])
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(RuntimeService(runtime), server)
    api_pb2_grpc.add_ImageServiceServicer_to_server(ImageService(runtime), server)
    socket_path = Path(config.socket)
    _bind(server, socket_path)
    runtime.streaming = _start_streaming(config, runtime)
    server.start()
    os.chmod(socket_path, 0o660)
    # Exits recorded at recovery (containers that ended while we were down) reach subscribers now.
    runtime.containers.publish_pending_stops()

    stop = threading.Event()
    watcher = threading.Thread(target=_watch_exits, args=(runtime, stop), name="exit-watcher", daemon=True)
    watcher.start()

    def shut_down(signum, frame):
        log.info("shutting down; containers keep running", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    log.info("serving CRI", extra={"socket": str(socket_path), "root": config.root, "state_dir": config.state_dir,
                                   "runc": runtime.runc_version, "conmon": runtime.conmon_version})
    stop.wait()
    server.stop(grace=5).wait()
    runtime.streaming.stop()
    try:
        socket_path.unlink()
    except FileNotFoundError:
        pass
    os.close(lock_fd)
