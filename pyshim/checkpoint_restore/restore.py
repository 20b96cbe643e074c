"""Restore from a checkpoint archive: what CreateContainer checks and what StartContainer unpacks.

A checkpoint archive (or a checkpoint image's layer, which is the same tar) is untrusted input: it
may come from any registry. Nothing security-relevant is taken from it -- the container's config is
built fresh from the new CreateContainerRequest and the base image. From the archive come only the
CRIU images (unpacked as plain files into a private directory), the writable-layer diff (applied
by criu_glue.rootfs_diff, which refuses anything that would land outside the rootfs), the old log
lines and facts used for decisions (the checkpoint's time, whether it holds established TCP
connections and from which pod address, and which bind mounts the process expects).
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import shutil
import socket
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from criu_glue import archive_format as fmt
from criu_glue.archive import CheckpointArchive, open_archive
from criu_glue.checkpoint_cache import CheckpointCache
from criu_glue.criu import (CriuAvailability, CritError, ProcessCredentials, RestoreImageFacts, SeccompMode,
                            log_excerpt,
                            prepare_restore_images)
from criu_glue.errors import ArchiveError, ArchiveFormatError, UnsafeArchive
from criu_glue.limits import Limits
from criu_glue.restore_mounts import ImageMount, exists_in_new_container, weaker_mounts
from criu_glue import lazy_pages
from criu_glue.rootfs_diff import apply_rootfs_diff
from oci.runtime_spec import SpecInputError, check_seccomp_profile, validate_container_config
from oci.tree_removal import remove_tree
from pyshim.checkpoint_restore import tcp_lock
# runc hands CRIU the options of this file (runc 1.1 has no --tcp-close flag).
from pyshim.checkpoint_restore.post_dump_hook import CRIU_CONFIG_ANNOTATION, criu_config_path
from pyshim.checkpoint_restore import detection
from pyshim.checkpoint_restore.detection import RestoreSource
from pyshim.checkpoint_restore.lazy_restore import PAGES_LOST_REASON, LazyRestores, LazyState, lazy_choice
from pyshim.config import CheckpointSettings
from pyshim.errors import FailedPrecondition, InvalidArgument, NotFound
from pyshim.internal import cgroups, crashpoints, mounts, netns, procs
from pyshim.internal.conmon import Conmon
from pyshim.internal.container_manager import ContainerManager, SandboxContext
from pyshim.internal.events import EventType
from pyshim.internal.intents import Intent, IntentJournal, Operation
from pyshim.internal.phases import PhaseTimer
from pyshim.internal.runc import Runc, RuncError
from pyshim.checkpoint_restore.records import RestoredFacts, RestoreOrigin
from pyshim.internal.state import ContainerMetadata, ContainerRecord, ContainerState, ContainerStatus, encode_config

log = logging.getLogger(__name__)

# Per-container override of the TCP decision, set on the new CreateContainerRequest:
# "established" keeps connections (needs the checkpointed pod address), "close" closes them.
TCP_ANNOTATION = "io.pyshim.restore.tcp"
# The checkpointed pod's addresses, which pyshim records in config.dump for the TCP decision.
POD_IPS_KEY = "podIPs"
# CRIU writes one of these per established TCP connection it dumped.
_TCP_STREAM_PREFIX = f"{fmt.CHECKPOINT_DIR}/tcp-stream-"
RESTORE_LOG = "restore.log"
# Files and directories engines bind into every container. CRIU wants each bind mount it dumped to
# exist at restore; where the new container has none (e.g. Podman's /run/.containerenv), an empty
# placeholder of ours is bound there. The archive only picks destinations from this fixed list.
ENGINE_BIND_MOUNTS = {"/etc/hosts": "file", "/etc/hostname": "file", "/etc/resolv.conf": "file",
                      "/run/.containerenv": "file", "/dev/termination-log": "file", "/dev/shm": "dir",
                      "/run/secrets": "dir"}


class TcpMode(str, enum.Enum):
    NONE = "none"                # the checkpoint holds no established connection
    ESTABLISHED = "established"  # connections restored (CRIU --tcp-established)
    CLOSE = "close"              # connections restored closed (CRIU tcp-close); listeners keep working


@dataclass(frozen=True)
class RestorePlan:
    """What the archive says, checked, as far as restoring needs it."""
    source: Path
    checkpoint_name: str
    base_image_refs: tuple[str, ...]  # most exact first: NAME@DIGEST / image id, then names
    checkpointed_at_ns: int
    established_tcp: bool
    checkpoint_ips: tuple[str, ...]
    process_args: tuple[str, ...]
    expected_bind_mounts: tuple[str, ...] = field(default=())  # volumes the new request must have
    engine_bind_mounts: tuple[str, ...] = field(default=())  # from ENGINE_BIND_MOUNTS


@dataclass(frozen=True)
class OpenCheckpoint:
    """A checked archive, open for the one restore that reads it (see Restorer.open)."""
    plan: RestorePlan
    archive: CheckpointArchive
    # False: unpack straight into the restore's directory, not through the image store's cache. A part of
    # a pod checkpoint is restored once, so hashing it for the cache would only cost CPU (while the
    # pod's other containers restore beside it) and push out archives restored again and again.
    cached: bool = True


@dataclass(frozen=True)
class UnpackResult:
    image_bytes: int
    milliseconds: dict[str, float]
    credentials: list[ProcessCredentials]  # what CRIU will give each process
    mounts: tuple[ImageMount, ...] = ()    # what CRIU will mount
    facts: RestoreImageFacts | None = None  # everything read from the images (seccomp modes, mounts, ...)
    images_from_cache: bool = False  # the CRIU images were already unpacked in the image store


def _unreadable(source: Path, exc: Exception) -> Exception:
    if isinstance(exc, UnsafeArchive):
        return InvalidArgument(f"checkpoint {source} refused: {exc}")
    return InvalidArgument(f"checkpoint {source} is not a usable checkpoint archive: {exc}")


class Restorer:
    def __init__(self, settings: CheckpointSettings, criu: CriuAvailability, limits: Limits = Limits(),
                 cache: CheckpointCache | None = None):
        self._settings = settings
        self.criu = criu
        self.limits = limits
        # Where CRIU images are unpacked once and linked from; None: copied out of the archive per restore.
        self.cache = cache

    def check_enabled(self) -> None:
        if not self._settings.enable_restore:
            raise FailedPrecondition("restoring checkpoints is disabled in this daemon's configuration "
                                     "(checkpoint.enable_restore = false)")
        if not self.criu.usable:
            raise FailedPrecondition(f"cannot restore: {self.criu.reason}")

    # ---- CreateContainer: cheap checks -------------------------------------------------------

    def plan(self, source: Path, config) -> RestorePlan:
        """Open and validate the archive; refuse it if the new request lacks a bind mount it expects."""
        with self.open(source, config) as checkpoint:
            return checkpoint.plan

    @contextlib.contextmanager
    def open(self, source: Path, config, cached: bool = True) -> Iterator[OpenCheckpoint]:
        """The archive, checked as plan() checks it and kept open, so StartContainer reads it once more
        only to unpack (opening indexes the whole archive, decompressing it if compressed)."""
        if not source.is_file():
            raise NotFound(f"checkpoint archive {source} not found")
        try:
            archive = open_archive(source, self.limits)
        except ArchiveError as e:
            raise _unreadable(source, e) from None
        with archive:
            try:
                plan = self._plan_from(archive, source)
            except ArchiveError as e:
                raise _unreadable(source, e) from None
            except (TypeError, AttributeError, KeyError, ValueError, RecursionError) as e:
                # A member of a shape no engine writes: the archive's fault, never ours.
                raise _unreadable(source, ArchiveFormatError(str(source), f"malformed metadata: "
                                                             f"{type(e).__name__}: {e}")) from None
            missing = sorted(set(plan.expected_bind_mounts) - {m.container_path for m in config.mounts})
            if missing:
                raise InvalidArgument(
                    f"checkpoint {source} expects bind mounts the new container does not have: "
                    f"{', '.join(missing)}; add them to the container's mounts (the restored process has "
                    "files open there)")
            yield OpenCheckpoint(plan, archive, cached)

    @staticmethod
    def _plan_from(archive: CheckpointArchive, source: Path) -> RestorePlan:
        config = archive.config()
        # Podman records no rootfsImageRef, only its bare image ID: config.image_id covers both.
        refs = [config.rootfs_image_ref, config.image_id, config.rootfs_image_name, config.rootfs_image]
        refs = tuple(dict.fromkeys(r for r in refs if r))
        if not refs:
            raise ArchiveFormatError(str(source), "config.dump names no base image (rootfsImage*)")
        ips = config.extra.get(POD_IPS_KEY) or _podman_ips(archive)
        if not isinstance(ips, list):
            raise ArchiveFormatError(str(source), f"{fmt.CONFIG_DUMP}: {POD_IPS_KEY} must be an array "
                                     "of addresses")
        args = (archive.spec().get("process") or {}).get("args") or []
        binds = {m.destination for m in archive.bind_mounts()} | _spec_bind_destinations(archive.spec())
        return RestorePlan(
            source=source, checkpoint_name=config.name, base_image_refs=refs,
            checkpointed_at_ns=config.checkpointed_time_ns or 0,
            established_tcp=any(n.startswith(_TCP_STREAM_PREFIX) for n in archive.member_names()),
            checkpoint_ips=tuple(str(ip) for ip in ips if isinstance(ip, str)),
            process_args=tuple(str(a) for a in args if isinstance(a, str)),
            expected_bind_mounts=tuple(sorted(binds - set(ENGINE_BIND_MOUNTS))),
            engine_bind_mounts=tuple(sorted(binds & set(ENGINE_BIND_MOUNTS))),
        )

    @staticmethod
    def tcp_mode(plan: RestorePlan, annotations, pod_ips: list[str]) -> TcpMode:
        forced = annotations.get(TCP_ANNOTATION, "")
        if forced:
            try:
                mode = TcpMode(forced)
            except ValueError:
                raise InvalidArgument(f"annotation {TCP_ANNOTATION}={forced!r}: use 'established' or 'close'") from None
            if mode == TcpMode.NONE:
                raise InvalidArgument(f"annotation {TCP_ANNOTATION}={forced!r}: use 'established' or 'close'")
            return mode if plan.established_tcp else TcpMode.NONE
        if not plan.established_tcp:
            return TcpMode.NONE
        # A connection can only live on where its local address still exists.
        if set(plan.checkpoint_ips) & {ip for ip in pod_ips if ip}:
            return TcpMode.ESTABLISHED
        return TcpMode.CLOSE

    # ---- StartContainer: the heavy work ------------------------------------------------------

    def unpack(self, checkpoint: OpenCheckpoint, images_dir: Path, rootfs: Path, log_path: str, hostname: str,
               allow_devices: bool = False, keep_setid: bool = False,
               images_ready: Callable[[], None] | None = None) -> UnpackResult:
        """CRIU images into `images_dir` (with the new pod's `hostname`); deleted files and the diff onto
        the mounted `rootfs` (set-id bits and file capabilities only with `keep_setid`, see
        keeps_setid_bits); the old log lines into `log_path`.

        With a cache, `images_dir` holds hard links to the images unpacked once in the image store
        (unpacked now if this is the first restore of this checkpoint image or archive file) and a
        private UTS image; without one, a copy of every image. `images_ready` is called once the CRIU
        images are in place, before the rest (a lazy restore starts its page source then)."""
        archive, source = checkpoint.archive, checkpoint.plan.source
        ms: dict[str, float] = {}
        started = time.perf_counter()
        limits = self.limits_for(images_dir.parent)
        from_cache = False
        try:
            if self.cache is not None and checkpoint.cached:
                cached = self.cache.images_of(archive, limits)
                ms["criu_images_unpack"] = _ms_since(started)
                self.cache.link(cached, images_dir)
                image_bytes, from_cache = cached.image_bytes, not cached.unpacked
            else:
                image_bytes = archive.extract_checkpoint_images(images_dir, limits)
            facts = prepare_restore_images(images_dir, hostname)
            if facts.root_mode is not None:
                os.chmod(rootfs, stat.S_IMODE(facts.root_mode) & 0o777)
            ms["criu_images"] = _ms_since(started)
            if images_ready is not None:
                images_ready()
            self._apply_diff(archive, images_dir.parent, rootfs, allow_devices, keep_setid, limits)
            ms["rootfs_diff"] = _ms_since(started) - ms["criu_images"]
            if log_path:
                self._carry_log(archive, Path(log_path))
        except ArchiveError as e:
            raise _unreadable(source, e) from None
        except CritError as e:
            raise InvalidArgument(f"checkpoint {source}: {e}") from None
        return UnpackResult(image_bytes, ms, facts.credentials, facts.mounts, facts, from_cache)

    def limits_for(self, directory: Path) -> Limits:
        """An archive never gets to fill the disk: what it may unpack is bounded by the free space too."""
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        return dataclasses.replace(self.limits, max_total_bytes=min(self.limits.max_total_bytes, free))

    def _apply_diff(self, archive: CheckpointArchive, scratch: Path, rootfs: Path, allow_devices: bool,
                    keep_setid: bool, limits: Limits) -> None:
        diff = None
        if archive.has_member(fmt.ROOTFS_DIFF_TAR):
            diff = scratch / "rootfs-diff.tar"
            archive.extract_member(fmt.ROOTFS_DIFF_TAR, diff)
        try:
            apply_rootfs_diff(diff, archive.deleted_files(), rootfs, limits, allow_devices=allow_devices,
                              keep_setid=keep_setid)
        finally:
            if diff is not None:
                diff.unlink(missing_ok=True)

    @staticmethod
    def _carry_log(archive: CheckpointArchive, log_path: Path) -> None:
        """The lines logged before the checkpoint stay in the container's log; conmon appends after them.

        The log starts as the archive's: whatever the path held belonged to the container that was
        checkpointed (a rollback or a host restart reuses its config, and with it its log path), and
        keeping it would repeat every line."""
        member = archive.log_member()
        if member is None:
            return
        log_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        with os.fdopen(fd, "wb") as out, archive.open_member(member) as src:
            shutil.copyfileobj(src, out)

    @staticmethod
    def keeps_setid_bits(spec: dict, privileged: bool) -> bool:
        """Set-uid/set-gid files and file capabilities in the archive's diff are kept only for a container
        that could make them itself: one running as root, or privileged. Anyone else would gain a way to
        root (or to capabilities) that the new request does not give."""
        return privileged or spec.get("process", {}).get("user", {}).get("uid", 0) == 0

    @staticmethod
    def check_privileges(processes: list[ProcessCredentials], spec: dict) -> None:
        """CRIU gives each process the credentials and seccomp filters in its core image; refuse any the new
        container's config.json does not grant (capabilities outside its bounding set, root for a non-root
        container, no seccomp filter at all where the new request asks for a profile)."""
        process = spec.get("process", {})
        allowed = set(process.get("capabilities", {}).get("bounding", []))
        uid = process.get("user", {}).get("uid", 0)
        # runc restore applies no filter of config.json (its linux.seccomp confines `exec` only), so an
        # unfiltered checkpoint would come back unfiltered whatever the request asks for.
        wants_seccomp = bool(spec.get("linux", {}).get("seccomp"))
        for proc in processes:
            if wants_seccomp and proc.seccomp_mode == SeccompMode.DISABLED:
                raise FailedPrecondition(
                    f"checkpoint process ({proc.image}) ran without a seccomp filter but the new container asks "
                    "for a seccomp profile, and a restored process keeps the filters it was checkpointed with; "
                    "restore it with seccomp Unconfined or restore a checkpoint taken with a profile")
            extra = sorted(proc.capabilities - allowed)
            if extra:
                raise FailedPrecondition(
                    f"checkpoint process ({proc.image}) holds capabilities the new container is not granted: "
                    f"{', '.join(extra)}; add them to the container's securityContext or restore a checkpoint "
                    "taken with fewer privileges")
            if uid != 0 and 0 in proc.uids:
                raise FailedPrecondition(
                    f"checkpoint process ({proc.image}) runs as root but the new container runs as uid {uid}")

    @staticmethod
    def check_mounts(mounts: tuple[ImageMount, ...], spec: dict, rootfs: Path) -> None:
        """CRIU rebuilds the mount table from the images, flags included: refuse one weaker than what a fresh
        container from the same request gets (a writable /proc/sys, an unmasked /proc/keys, a /dev/shm
        without nosuid...)."""
        problems = weaker_mounts(mounts, spec, exists_in_new_container(rootfs))
        if problems:
            raise FailedPrecondition(
                "checkpoint would restore mounts weaker than the new container's: " + "; ".join(problems)
                + ". Restore a checkpoint taken with at least the request's read-only and masked paths, or "
                "relax the request (e.g. privileged)")

    @staticmethod
    def add_engine_placeholders(spec: dict, plan: RestorePlan, bundle: Path) -> None:
        """Empty stand-ins for engine files the checkpointed container had bind-mounted and the new one
        lacks (or has as another kind, like a tmpfs /dev/shm): CRIU restores a dumped bind mount only
        onto a bind mount, else it stops with "No mapping for ... mountpoint"."""
        binds = _spec_bind_destinations(spec)
        for destination in plan.engine_bind_mounts:
            if destination in binds:
                continue
            spec["mounts"] = [m for m in spec.get("mounts", []) if m.get("destination") != destination]
            source = bundle / "placeholders" / destination.strip("/").replace("/", "_")
            source.parent.mkdir(mode=0o700, exist_ok=True)
            if ENGINE_BIND_MOUNTS[destination] == "dir":
                source.mkdir(mode=0o755, exist_ok=True)
            else:
                source.touch(mode=0o644)
            spec.setdefault("mounts", []).append(
                {"destination": destination, "type": "bind", "source": str(source),
                 "options": ["rbind", "rw" if ENGINE_BIND_MOUNTS[destination] == "dir" else "ro"]})

    @staticmethod
    def write_criu_config(mode: TcpMode, path: Path) -> Path | None:
        """CRIU options runc has no flag for, in the file runc names to CRIU (annotation org.criu.config)."""
        if mode != TcpMode.CLOSE:
            return None
        path.write_text("tcp-close\n")
        return path

    @staticmethod
    def runc_restore_args(mode: TcpMode) -> tuple[str, ...]:
        # --file-locks at restore too: without it CRIU drops the locks the process held.
        # --manage-cgroups-mode=ignore: the process joins the new pod's cgroup, never the old one.
        args = ["--file-locks", "--manage-cgroups-mode=ignore"]
        if mode == TcpMode.ESTABLISHED:
            args.append("--tcp-established")
        return tuple(args)

    @staticmethod
    def failure_message(bundle: Path, error: str) -> str:
        return f"restore failed: {error}\nCRIU log ({RESTORE_LOG}):\n{log_excerpt(bundle / RESTORE_LOG)}"


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _spec_bind_destinations(spec: dict) -> set[str]:
    mounts = spec.get("mounts") if isinstance(spec.get("mounts"), list) else []
    return {m["destination"] for m in mounts
            if isinstance(m, dict) and isinstance(m.get("destination"), str)
            and (m.get("type") == "bind" or "bind" in (m.get("options") or []) or "rbind" in (m.get("options") or []))}


def _podman_ips(archive: CheckpointArchive) -> list[str]:
    """Podman records the container's addresses in network.status (a map of network name to result)."""
    raw = archive.metadata_member(fmt.NETWORK_STATUS)
    if not raw:
        return []
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # unreadable addresses: decide TCP as if none were recorded
        return []
    ips: list[str] = []
    networks = doc.values() if isinstance(doc, dict) else []
    for network in networks:
        for iface in (network.get("interfaces") or {}).values() if isinstance(network, dict) else []:
            for subnet in iface.get("subnets") or [] if isinstance(iface, dict) else []:
                ipnet = subnet.get("ipnet", "") if isinstance(subnet, dict) else ""
                if ipnet:
                    ips.append(ipnet.split("/", 1)[0])
    return ips


# ---- the restore flow: CreateContainer records, StartContainer restores, recovery repairs --------------


def _with_command(config, plan: RestorePlan):
    """CRIU restores the process itself, but config.json must still name one: a checkpoint image has no
    entrypoint, so the checkpointed command is shown when the request gives none."""
    if config.command or config.args or not plan.process_args:
        return config
    copy = type(config)()
    copy.CopyFrom(config)
    copy.command.extend(plan.process_args)
    return copy


class RestoreEngine:
    """A container restored from a checkpoint, from CreateContainer to running (CRI-O's
    internal/lib/restore.go is the model). The container is an ordinary record of the ContainerManager,
    whose name reservation, lock, `update_status` and events this uses; the archive work is the
    Restorer's; runc and conmon are called directly, as the manager does for a plain start."""

    def __init__(self, containers: ContainerManager, restorer: Restorer, runc: Runc, conmon: Conmon,
                 images, puller, intents: IntentJournal, lazy_default: bool = False):
        self._containers = containers
        self._restorer = restorer
        self._runc = runc
        self._conmon = conmon
        self._images = images  # oci.store.ImageStore
        self._puller = puller  # pyshim.internal.image_pulls.ImagePuller: the base image may be missing
        self._intents = intents
        # Post-copy restores: their lazy-pages daemons (lazy_restore.py); lazy_default is the config's.
        self._lazy = LazyRestores(containers.container_dir("-").parent)
        self._lazy.on_pages_lost(self._kill_for_lost_pages, self._still_runs)
        self._lazy_default = lazy_default
        containers.on_remove(lambda record: self._lazy.discard(record.id, record.bundle))

    def source_of(self, config) -> RestoreSource | None:
        """The checkpoint a CreateContainer restores from, checked; None for an ordinary container."""
        return detection.restore_source(self._restorer, self._images, config)

    # ---- CreateContainer ---------------------------------------------------------------------

    def create(self, sandbox: SandboxContext, config, source: RestoreSource,
               container_id: str = "") -> ContainerRecord:
        """Record a container that StartContainer will restore. Cheap on purpose: kubelet gives
        CreateContainer two minutes, and unpacking a big checkpoint can take longer. `container_id`:
        one the caller journaled before (RestorePod), else a fresh one."""
        try:
            validate_container_config(config)
            check_seccomp_profile(config.linux.security_context)  # the spec is built only at StartContainer
        except SpecInputError as e:
            raise InvalidArgument(str(e)) from None
        lazy_choice(config.annotations, self._lazy_default)  # a bad lazy annotation fails here, not at start
        plan = source.plan
        containers = self._containers
        with containers.reserve_name(config, sandbox, container_id) as (container_id, key):
            cdir = containers.container_dir(container_id)
            record = ContainerRecord(ContainerMetadata(
                id=container_id, sandbox_id=sandbox.record.id, name=key, attempt=config.metadata.attempt,
                config_b64=encode_config(config), image_ref=config.image.image,
                image_id=source.checkpoint_image_id or str(plan.source), image_name=config.image.image,
                created_at=time.time_ns(), dir=str(cdir), log_path=containers.log_path_for(sandbox.config, config),
                cgroups_path=f"{sandbox.record.cgroup_parent.rstrip('/')}/{container_id}",
                restore=RestoreOrigin(source=str(plan.source), checkpoint_time_ns=plan.checkpointed_at_ns),
            ))
            with contextlib.ExitStack() as undo:
                cdir.mkdir(mode=0o700)
                undo.callback(remove_tree, cdir, ignore_errors=True)
                for sub in (record.upper, record.work, record.rootfs):
                    sub.mkdir(mode=0o755)
                containers.add(record)
                undo.pop_all()
        containers.publish(record, EventType.CREATED)
        log.info("container created for restore", extra={"container": container_id, "sandbox": sandbox.record.id,
                                                         "checkpoint": str(plan.source)})
        return record

    # ---- StartContainer ----------------------------------------------------------------------

    def start(self, container_id: str, sandbox: SandboxContext, cached: bool = True,
              checkpoint: OpenCheckpoint | None = None) -> ContainerRecord:
        """Restore a container CreateContainer recorded for restore. The archive is checked again (it may
        have changed since CreateContainer) and the base image pulled if this node lacks it. `cached`:
        see OpenCheckpoint. `checkpoint`: the archive as checked and kept open since the container was
        recorded (RestorePod's parts), the very file that was checked: not opened and indexed again."""
        self._restorer.check_enabled()
        record = self._containers.get(container_id)
        if checkpoint is not None:
            image = detection.base_image(self._images, self._puller, checkpoint.plan.base_image_refs)
            return self._start(record.id, sandbox, image, checkpoint)
        config = self._containers.config_of(record)
        with self._restorer.open(Path(record.restore_from), config, cached=cached) as checkpoint:
            image = detection.base_image(self._images, self._puller, checkpoint.plan.base_image_refs)
            return self._start(record.id, sandbox, image, checkpoint)

    def _start(self, container_id: str, sandbox: SandboxContext, base_image,
               checkpoint: OpenCheckpoint) -> ContainerRecord:
        """Restore the checkpoint into the new pod: rootfs from the base image plus the checkpoint's
        diff, config.json built fresh from the new request, then `runc restore` under conmon.
        On failure the container is EXITED with reason RestoreFailed and nothing is left mounted."""
        containers = self._containers
        record = containers.get(container_id)
        with containers.lock_for(record.id):
            if record.state != ContainerState.CREATED or not record.pending_restore:
                raise FailedPrecondition(f"container {record.id} is {record.state.value}, not a CREATED restore")
            try:
                with self._intents.track(Operation.RESTORE_CONTAINER, record.id, step="rootfs",
                                         images_dir=str(record.bundle / "checkpoint"),
                                         base_image_id=base_image.id) as intent:
                    self._restore_locked(record, sandbox, base_image, checkpoint, intent)
            except Exception as e:
                message = getattr(e, "message", str(e))
                containers.mark_exited(record, 1, time.time_ns(), reason="RestoreFailed", message=message)
                raise
        containers.publish(record, EventType.STARTED)
        return containers.refresh(record)

    def _restore_locked(self, record: ContainerRecord, sandbox: SandboxContext, base_image,
                        checkpoint: OpenCheckpoint, intent: Intent) -> None:
        containers = self._containers
        config = containers.config_of(record)
        plan = checkpoint.plan
        mode = self._restorer.tcp_mode(plan, config.annotations, [sandbox.record.ip, *sandbox.record.additional_ips])
        images_dir = record.bundle / "checkpoint"
        lazy = lazy_choice(config.annotations, self._lazy_default)
        phases = PhaseTimer()
        with contextlib.ExitStack() as undo:
            if not lazy.lazy:  # a lazy restore's daemon reads the page images until every page arrived
                undo.callback(remove_tree, images_dir, ignore_errors=True)  # CRIU is done with them either way
            mounts.mount_overlay(self._images.layer_paths(base_image), record.upper, record.work, record.rootfs)
            failed = undo.enter_context(contextlib.ExitStack())
            failed.callback(mounts.unmount, record.rootfs)
            if lazy.lazy:
                failed.callback(remove_tree, images_dir, ignore_errors=True)
            phases.mark("rootfs")
            spec = containers.build_spec(record, sandbox, _with_command(config, plan), base_image)
            # A crash point, not a journal write: recovery repairs a cut restore the same at every step,
            # and an fsync here waits behind the pod's other restores' unpacking.
            crashpoints.reached(f"{Operation.RESTORE_CONTAINER.value}:unpack")

            def launch_page_source() -> None:
                # As soon as the images are in place: the daemon starts while the diff, the checks and
                # the spec are done, and is waited for only before runc (runc's work path is the
                # bundle: CRIU finds the daemon's socket there).
                self._lazy.launch(record.id, record.bundle, images_dir, lazy.page_server)
                failed.callback(self._lazy.abort, record.id)

            unpacked = self._restorer.unpack(checkpoint, images_dir, record.rootfs, record.log_path,
                                             sandbox.record.hostname or socket.gethostname(),
                                             allow_devices=config.linux.security_context.privileged,
                                             keep_setid=self._restorer.keeps_setid_bits(
                                                 spec, config.linux.security_context.privileged),
                                             images_ready=launch_page_source if lazy.lazy else None)
            self._restorer.check_privileges(unpacked.credentials, spec)
            self._restorer.check_mounts(unpacked.mounts, spec, record.rootfs)
            phases.mark("unpack")
            self._restorer.add_engine_placeholders(spec, plan, record.bundle)
            if mode == TcpMode.ESTABLISHED and sandbox.record.netns_name:
                # The connections come back here: lift the lock a stopping checkpoint left on them.
                tcp_lock.unlock_all(str(netns.netns_path(sandbox.record.netns_name)))
            criu_config = self._restorer.write_criu_config(mode, criu_config_path(record.bundle))
            if criu_config:
                spec.setdefault("annotations", {})[CRIU_CONFIG_ANNOTATION] = str(criu_config)
            (record.bundle / "config.json").write_text(json.dumps(spec))
            phases.mark("spec")
            self._intents.advance(intent, "runc_restore", tcp=mode.value, lazy=lazy.lazy)
            restore_args = self._restorer.runc_restore_args(mode)
            if lazy.lazy:
                self._lazy.wait_ready(record.id)
                restore_args += lazy_pages.RUNC_RESTORE_ARGS
                phases.mark("lazy_pages_daemon")
            try:
                pid = self._conmon.create(record.id, record.name, containers.paths(record), record.log_path,
                                          stdin=config.stdin, stdin_once=config.stdin_once, tty=config.tty,
                                          restore_from=images_dir, restore_args=restore_args)
            except RuncError as e:
                self._runc.delete(record.id, force=True)
                raise FailedPrecondition(self._restorer.failure_message(record.bundle, e.message)) from None
            phases.mark("runc_restore")
            crashpoints.reached("restore_container:record")
            started = time.time_ns()
            restored = RestoredFacts(base_image_id=base_image.id, tcp=mode.value, phases_ms={
                **phases.report(), **{f"unpack_{k}": v for k, v in unpacked.milliseconds.items()}})
            containers.update_status(record, lambda s: replace(s, state=ContainerState.RUNNING, pid=pid,
                                                               started_at=started, restored=restored))
            failed.pop_all()
            if lazy.lazy:
                self._lazy.supervise(record.id)
        log.info("container restored", extra={"container": record.id, "checkpoint": record.restore_from,
                                               "tcp": mode.value, "image_bytes": unpacked.image_bytes,
                                               "ms": dict(record.restored.phases_ms)})

    # ---- lazy (post-copy) restores ------------------------------------------------------------

    def lazy_status(self, record: ContainerRecord) -> dict:
        """The verbose status of a lazy restore's page transfer ({} for any other container)."""
        return self._lazy.status(record.id, record.bundle) if record.restored else {}

    def refuse_while_pages_arrive(self, record: ContainerRecord) -> None:
        """A checkpoint of a lazily restored process whose pages are still arriving is refused: CRIU
        would dump memory that is only partly in place (not tried: refused until it has been)."""
        if self.lazy_status(record).get("lazyPages") == LazyState.TRANSFERRING.value:
            raise FailedPrecondition(f"container {record.id} was restored lazily and its memory is still "
                                     "arriving (verbose status lazyPages: transferring); checkpoint it once "
                                     "lazyPages is complete")

    def wait_lazy_pages(self, container_id: str, timeout: float) -> bool:
        """Until the container's page transfer has ended (tests, benchmarks); True if it has."""
        return self._lazy.wait(container_id, timeout)

    def recover_lazy_pages(self) -> None:
        """At start-up, after the records were reconciled: adopt or judge each lazy restore's daemon."""
        self._lazy.recover((r.id, r.bundle, r.state == ContainerState.RUNNING) for r in self._containers.all())

    def _still_runs(self, container_id: str) -> bool:
        record = self._containers.find(container_id)
        if record is None:
            return False
        with self._containers.lock_for(record.id):
            self._containers.refresh(record)
            return record.state == ContainerState.RUNNING

    def _kill_for_lost_pages(self, container_id: str, message: str) -> bool:
        """The lazy-pages daemon died before every page arrived: the process would read zeroes where
        its memory should be, so it is killed, EXITED with reason LazyPagesFailed and `message`.
        False when it had ended already."""
        containers = self._containers
        record = containers.find(container_id)
        if record is None:
            return False
        with containers.lock_for(record.id):
            containers.refresh(record)
            if record.state != ContainerState.RUNNING:
                return False
            self._runc.kill(record.id, "KILL", all_processes=True)
            paths, deadline = containers.paths(record), time.monotonic() + 10
            while (exited := Conmon.exit_code(paths, record.id)) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            code, when = exited if exited is not None else (137, time.time())
            containers.mark_exited(record, code, int(when * 1e9), reason=PAGES_LOST_REASON, message=message)
        log.warning("container killed: its lazy pages can no longer arrive",
                    extra={"container": record.id, "why": message})
        return True

    # ---- recovery after a crash --------------------------------------------------------------

    def recover(self, intents: list[Intent]) -> None:
        """At start-up, before the ContainerManager reconciles its records: repair every restore a
        killed daemon left half-done. Idempotent."""
        for intent in intents:
            if intent.operation == Operation.RESTORE_CONTAINER:
                self._recover_restore(intent)
                self._intents.finish(intent)

    def _recover_restore(self, intent: Intent) -> None:
        """A restore's StartContainer killed midway. If conmon is alive and runc says the restored
        container runs, it is adopted: it runs under its monitor, its output goes to its log, and
        killing it would lose the very state the restore brought back. Anything else (killed before
        or during the unpack, or `runc restore` failed or the process already ended) is killed and
        reset to CREATED with the restore pending, images dir, mount and rootfs layer emptied, so that
        kubelet's retried StartContainer restores cleanly and the workload runs exactly once."""
        containers = self._containers
        record = containers.recorded(intent.target)
        if record is None:
            containers.remove_leftovers(intent.target, "")
            return
        if not record.pending_restore:
            return  # the record was saved restored: only the intent's close was lost
        paths = containers.paths(record)
        conmon_pid = procs.read_pidfile(paths.conmon_pidfile)
        state = self._runc_state(record.id)
        images_dir = Path(intent.facts.get("images_dir") or record.bundle / "checkpoint")
        if procs.is_conmon_of(conmon_pid, record.id) and state is not None and state.status == "running":
            started = procs.start_time_ns(state.pid) or time.time_ns()

            restored = RestoredFacts(base_image_id=intent.facts.get("base_image_id", ""),
                                     tcp=intent.facts.get("tcp", ""))

            def adopted(s: ContainerStatus) -> ContainerStatus | None:
                if s.restored is not None:
                    return None
                return replace(s, state=ContainerState.RUNNING, pid=state.pid, started_at=started,
                               restored=restored, message="restore adopted after a daemon restart")
            if containers.update_status(record, adopted):
                remove_tree(images_dir, ignore_errors=True)
                log.warning("recovery: interrupted restore is running under its conmon; adopted it as RUNNING",
                            extra={"container": record.id, "pid": state.pid, "conmon": conmon_pid})
                containers.publish(record, EventType.STARTED)
            return
        containers.kill_container_processes(record.id, conmon_pid)
        mounts.unmount(record.rootfs)
        remove_tree(images_dir, ignore_errors=True)
        for layer_dir in (record.upper, record.work):  # the diff is applied again at the retry
            remove_tree(layer_dir, ignore_errors=True)
            layer_dir.mkdir(mode=0o755, exist_ok=True)
        for leftover in (paths.exit_dir / record.id, paths.conmon_pidfile, paths.container_pidfile,
                         paths.persist_dir / "oom"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        if record.cgroups_path:
            cgroups.remove(record.cgroups_path)
        log.warning("recovery: interrupted restore did not come up under a monitor; killed what it started "
                    "and reset the container to CREATED for a clean retry",
                    extra={"container": record.id, "step": intent.step,
                           "runc": state.status if state else "none"})

    def _runc_state(self, container_id: str):
        try:
            return self._runc.state(container_id)
        except RuncError:
            return None
