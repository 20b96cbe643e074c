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
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from criu_glue import archive_format as fmt
from criu_glue.archive import CheckpointArchive, open_archive
from criu_glue.checkpoint_cache import CheckpointCache
from criu_glue.criu import (CriuAvailability, CritError, ProcessCredentials, RestoreImageFacts, SeccompMode,
                            log_excerpt,
                            prepare_restore_images)
from criu_glue.errors import ArchiveError, ArchiveFormatError, UnsafeArchive
from criu_glue.limits import Limits
from criu_glue.restore_mounts import ImageMount, exists_in_new_container, weaker_mounts
from criu_glue.rootfs_diff import apply_rootfs_diff
from pyshim.config import CheckpointSettings
from pyshim.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)

# Per-container override of the TCP decision, set on the new CreateContainerRequest:
# "established" keeps connections (needs the checkpointed pod address), "close" closes them.
TCP_ANNOTATION = "io.pyshim.restore.tcp"
# The checkpointed pod's addresses, which pyshim records in config.dump for the TCP decision.
POD_IPS_KEY = "podIPs"
# CRIU writes one of these per established TCP connection it dumped.
_TCP_STREAM_PREFIX = f"{fmt.CHECKPOINT_DIR}/tcp-stream-"
# runc hands CRIU the options of this file (runc 1.1 has no --tcp-close flag).
CRIU_CONFIG_ANNOTATION = "org.criu.config"
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
               allow_devices: bool = False, keep_setid: bool = False) -> UnpackResult:
        """CRIU images into `images_dir` (with the new pod's `hostname`); deleted files and the diff onto
        the mounted `rootfs` (set-id bits and file capabilities only with `keep_setid`, see
        keeps_setid_bits); the old log lines into `log_path`.

        With a cache, `images_dir` holds hard links to the images unpacked once in the image store
        (unpacked now if this is the first restore of this checkpoint image or archive file) and a
        private UTS image; without one, a copy of every image."""
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
