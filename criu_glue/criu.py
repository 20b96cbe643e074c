"""Facts about CRIU that pyshim needs around a `runc checkpoint`: is it usable, what went wrong, how long
did it take, and what a restore must check in the images. CRIU itself is driven by runc; its images
are decoded in this process from their protobuf messages (criu_glue.criu_images, CRIU's own .proto)."""
from __future__ import annotations

import enum
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from . import criu_images
from .criu_pb import fdinfo_pb2, mnt_pb2
from .restore_mounts import ImageMount

CRIT = "/usr/bin/crit"


@dataclass(frozen=True)
class CriuAvailability:
    usable: bool
    version: str  # "4.2.1", or "" when CRIU is missing
    reason: str  # why not usable; "" when usable


def _parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def criu_availability(min_version: str, binary: str = "criu") -> CriuAvailability:
    path = shutil.which(binary)
    if not path:
        return CriuAvailability(False, "", f"CRIU ({binary}) is not installed; checkpoint/restore need CRIU >= {min_version}")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return CriuAvailability(False, "", f"cannot run {path} --version: {e}")
    match = re.search(r"Version:\s*([\d.]+)", out)
    version = match.group(1) if match else ""
    if not version or _parse_version(version) < _parse_version(min_version):
        return CriuAvailability(False, version, f"CRIU {version or '(unknown version)'} at {path} is too old: "
                                                f"pyshim needs >= {min_version} on this kernel")
    return CriuAvailability(True, version, "")


def log_excerpt(log_path: Path, max_lines: int = 12) -> str:
    """The lines of a CRIU log a person needs: its errors and warnings, else its last lines."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no CRIU log at {log_path})"
    important = [line.strip() for line in lines if "Error" in line or "Warn" in line]
    chosen = important[-max_lines:] if important else [line.strip() for line in lines[-max_lines:]]
    return "\n".join(chosen)


@dataclass(frozen=True)
class DumpStats:
    freezing_time_us: int
    frozen_time_us: int
    memdump_time_us: int
    memwrite_time_us: int
    pages_scanned: int
    pages_written: int

    def as_log_fields(self) -> dict:
        return {"criu_freezing_us": self.freezing_time_us, "criu_frozen_us": self.frozen_time_us,
                "criu_memdump_us": self.memdump_time_us, "criu_memwrite_us": self.memwrite_time_us,
                "criu_pages_scanned": self.pages_scanned, "criu_pages_written": self.pages_written}


def read_dump_stats(stats_file: Path) -> DumpStats | None:
    """CRIU's `stats-dump`; None if it is missing or unreadable."""
    try:
        image = criu_images.read_image(stats_file, criu_images.STATS)
    except criu_images.CriuImageError:
        return None
    if not image.entries or not image.entries[0].HasField("dump"):
        return None
    dump = image.entries[0].dump
    return DumpStats(
        freezing_time_us=dump.freezing_time, frozen_time_us=dump.frozen_time, memdump_time_us=dump.memdump_time,
        memwrite_time_us=dump.memwrite_time, pages_scanned=dump.pages_scanned, pages_written=dump.pages_written)


def has_established_tcp(pid: int) -> bool:
    """Whether the process's network namespace holds an established TCP connection (state 01)."""
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f, None)
                if any(line.split()[3] == "01" for line in f if len(line.split()) > 3):
                    return True
        except OSError:
            continue
    return False


class CritError(Exception):
    """crit could not decode or encode a CRIU image (kept for callers; the daemon no longer runs crit)."""


# Linux capability numbers (include/uapi/linux/capability.h), as CRIU stores them: bit N of the sets.
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)

class SeccompMode(enum.IntEnum):
    """A thread's seccomp mode (linux/seccomp.h, CRIU's seccomp_mode enum)."""
    DISABLED = 0
    STRICT = 1
    FILTER = 2


@dataclass(frozen=True)
class ProcessCredentials:
    image: str  # core-<pid>.img
    uids: tuple[int, ...]  # uid, euid, suid, fsuid
    gids: tuple[int, ...]
    capabilities: frozenset[str]  # union of the inheritable, permitted, effective, bounding and ambient sets
    # What CRIU restores: the thread's own mode and filters (seccomp.img), never the new config.json's.
    # None: the image holds no living thread (a zombie or a CRIU helper task).
    seccomp_mode: SeccompMode | None = SeccompMode.DISABLED


def _cap_names(words: list[int]) -> set[str]:
    names = set()
    for word_index, word in enumerate(words or []):
        for bit in range(32):
            if word >> bit & 1:
                number = word_index * 32 + bit
                names.add(CAPABILITIES[number] if number < len(CAPABILITIES) else f"CAP_{number}")
    return names


@dataclass(frozen=True)
class MountPoint:
    """One mount of the checkpointed mount namespace (mountpoints-<id>.img, mnt.proto)."""
    mnt_id: int
    parent_mnt_id: int
    mountpoint: str  # where, as CRIU records it (relative to the namespace root, e.g. "/proc/sys")
    fstype: str      # "proc", "sysfs", "tmpfs", ...; CRIU's fsname for types it handles as "auto"
    source: str
    root: str        # the mounted subtree of its filesystem ("/" for a whole one)
    options: str
    flags: int       # MS_* mount flags (MS_RDONLY = 1)
    sb_flags: int
    external: bool   # a bind mount from outside (runc hands these to CRIU as external)


@dataclass(frozen=True)
class TcpStream:
    """One established TCP connection CRIU dumped (tcp-stream-<inode>.img)."""
    image: str
    inq_len: int   # bytes received, not yet read by the process
    outq_len: int  # bytes in the send queue


@dataclass(frozen=True)
class RestoreImageFacts:
    credentials: list[ProcessCredentials]
    root_mode: int | None  # mode of the container's / when dumped
    mounts: tuple[ImageMount, ...] = ()  # what CRIU will mount (criu_glue.restore_mounts checks it)
    seccomp_modes: dict[str, SeccompMode] = field(default_factory=dict)  # core-<tid>.img -> mode
    mountpoints: tuple[MountPoint, ...] = ()
    tcp_streams: tuple[TcpStream, ...] = ()
    dumped_hostname: str = ""  # the UTS nodename in the images before the new pod's was written


def prepare_restore_images(images_dir: Path, hostname: str) -> RestoreImageFacts:
    """Set the restored hostname in the images and read what restore must check in them.

    Decoded here, from the protobuf messages (criu_glue.criu_images), not by crit: a second
    interpreter cost ~150 ms per restore. CriuImageError (an ArchiveError) for a malformed image."""
    facts = read_restore_facts(images_dir)
    set_uts_hostname(images_dir, hostname)
    return facts


def set_uts_hostname(images_dir: Path, hostname: str) -> None:
    """Give the UTS namespace image the new pod's hostname: CRIU writes the dumped one into the
    namespace it joins, which would rename the new pod after the old one. The image is replaced by
    a new file (criu_images.write_image), never written through a link to a shared copy."""
    for path in sorted(images_dir.glob("utsns-*.img")):
        image = criu_images.read_image(path, criu_images.UTSNS)
        for entry in image.entries:
            entry.nodename = hostname
        criu_images.write_image(path, image)


def read_restore_facts(images_dir: Path) -> RestoreImageFacts:
    """Each thread's credentials and seccomp mode, the mode of /, the mounts and the TCP streams."""
    credentials, seccomp = [], {}
    for path in sorted(images_dir.glob("core-*.img")):
        core = _single_entry(criu_images.read_image(path, criu_images.CORE), path)
        credentials.append(_credentials(path.name, core))
        seccomp[path.name] = _seccomp_mode(core)
    hostname = ""
    for path in sorted(images_dir.glob("utsns-*.img")):
        entries = criu_images.read_image(path, criu_images.UTSNS).entries
        hostname = hostname or (entries[0].nodename if entries else "")
    mount_entries = [(path.name, entry) for path in sorted(images_dir.glob("mountpoints-*.img"))
                     for entry in criu_images.read_image(path, criu_images.MNTS).entries]  # read once
    mounts = tuple(_mountpoint(entry) for _, entry in mount_entries)
    image_mounts = tuple(_image_mount(name, entry) for name, entry in mount_entries)
    streams = tuple(TcpStream(path.name, entry.inq_len, entry.outq_len)
                    for path in sorted(images_dir.glob("tcp-stream-*.img"))
                    for entry in criu_images.read_image(path, criu_images.TCP_STREAM).entries)
    return RestoreImageFacts(credentials, _root_mode(images_dir), image_mounts, seccomp, mounts, streams, hostname)


def _single_entry(image: criu_images.CriuImage, path: Path):
    if len(image.entries) != 1:
        raise criu_images.CriuImageError(f"CRIU image {path.name} holds {len(image.entries)} entries, "
                                         "a core image holds one")
    return image.entries[0]


def _credentials(image: str, core) -> ProcessCredentials:
    # No creds in the image reads as uid/gid 0 and no capabilities: the check then treats the
    # process as root, the cautious reading.
    c = core.thread_core.creds
    caps: set[str] = set()
    for words in (c.cap_inh, c.cap_prm, c.cap_eff, c.cap_bnd, c.cap_amb):
        caps |= _cap_names(list(words))
    # A zombie's or a CRIU helper's image has no thread: nothing a filter could be restored to (None).
    seccomp = _seccomp_mode(core) if core.HasField("thread_core") else None
    return ProcessCredentials(image=image, uids=(c.uid, c.euid, c.suid, c.fsuid),
                              gids=(c.gid, c.egid, c.sgid, c.fsgid), capabilities=frozenset(caps),
                              seccomp_mode=seccomp)


def _seccomp_mode(core) -> SeccompMode:
    # CRIU >= 3.x records the mode per thread; older images only in the task's old_seccomp_mode.
    if core.thread_core.HasField("seccomp_mode"):
        value = core.thread_core.seccomp_mode
    else:
        value = core.tc.old_seccomp_mode
    # An unknown mode reads as FILTER, the restrictive reading.
    return SeccompMode(value) if value in SeccompMode._value2member_map_ else SeccompMode.FILTER


def _mountpoint(entry) -> MountPoint:
    fstype = mnt_pb2.fstype.Name(entry.fstype).lower() if entry.fstype in mnt_pb2.fstype.values() \
        else str(entry.fstype)
    if entry.fsname:
        fstype = entry.fsname
    return MountPoint(mnt_id=entry.mnt_id, parent_mnt_id=entry.parent_mnt_id, mountpoint=entry.mountpoint,
                      fstype=fstype, source=entry.source, root=entry.root, options=entry.options,
                      flags=entry.flags, sb_flags=entry.sb_flags, external=entry.ext_mount)


def _image_mount(image: str, entry) -> ImageMount:
    """The mount as criu_glue.restore_mounts checks it against the new request."""
    return ImageMount.from_entry({"image": image, "mnt_id": entry.mnt_id, "parent_mnt_id": entry.parent_mnt_id,
                                  "mountpoint": entry.mountpoint, "fstype": entry.fstype, "root": entry.root,
                                  "flags": entry.flags, "sb_flags": entry.sb_flags, "ext_key": entry.ext_key})


def _root_mode(images_dir: Path) -> int | None:
    # CRIU refuses to restore open references to a / whose mode differs from the dumped one.
    path = images_dir / "files.img"
    if not path.exists():
        return None
    for entry in criu_images.read_image(path, criu_images.FILES).entries:
        if entry.type == fdinfo_pb2.REG and entry.HasField("reg") and entry.reg.name == "/" \
                and entry.reg.HasField("mode"):
            return entry.reg.mode
    return None
