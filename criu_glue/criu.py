"""Facts about CRIU that pyshim needs around a `runc checkpoint`: is it usable, what went wrong, how long
did it take. CRIU itself is driven by runc; images are decoded with CRIU's own `crit`, never by hand."""
from __future__ import annotations

import enum
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

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
    """CRIU's `stats-dump`, decoded by crit; None if it is missing or crit is not installed."""
    if not stats_file.exists() or not Path(CRIT).exists():
        return None
    proc = subprocess.run([CRIT, "decode", "-i", str(stats_file)], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return None
    try:
        dump = json.loads(proc.stdout)["entries"][0]["dump"]
    except (ValueError, KeyError, IndexError):
        return None
    return DumpStats(
        freezing_time_us=int(dump.get("freezing_time", 0)), frozen_time_us=int(dump.get("frozen_time", 0)),
        memdump_time_us=int(dump.get("memdump_time", 0)), memwrite_time_us=int(dump.get("memwrite_time", 0)),
        pages_scanned=int(dump.get("pages_scanned", 0)), pages_written=int(dump.get("pages_written", 0)))


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
    """crit could not decode or encode a CRIU image."""


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
class RestoreImageFacts:
    credentials: list[ProcessCredentials]
    root_mode: int | None  # mode of the container's / when dumped
    mounts: tuple[ImageMount, ...] = ()  # what CRIU will mount (criu_glue.restore_mounts checks it)


# One interpreter, CRIU's own pycriu: give the UTS namespace the new hostname (CRIU writes the dumped
# one into the namespace it joins, which would rename the new pod after the old one), and report each
# process's credentials and the mode of / (CRIU refuses open references to a / of another mode).
_PREPARE_SCRIPT = """
import glob, json, os, sys, pycriu
images, hostname = sys.argv[1], sys.argv[2]
def load(path):
    with open(path, "rb") as f:
        return pycriu.images.load(f)
for path in sorted(glob.glob(os.path.join(images, "utsns-*.img"))):
    doc = load(path)
    for entry in doc["entries"]:
        entry["nodename"] = hostname
    with open(path + ".new", "wb") as f:
        pycriu.images.dump(doc, f)
    os.replace(path + ".new", path)
creds = []
for path in sorted(glob.glob(os.path.join(images, "core-*.img"))):
    entry = load(path)["entries"][0]
    thread = entry.get("thread_core", {})
    # CRIU leaves the mode out when seccomp is disabled; older images kept it in the task core. A zombie's
    # or a helper's image has no thread at all, hence nothing a filter could be restored to (None).
    seccomp = thread.get("seccomp_mode", entry.get("tc", {}).get("old_seccomp_mode", "disabled")) \
        if "thread_core" in entry else None
    creds.append({"image": os.path.basename(path), "creds": thread.get("creds") or {}, "seccomp": seccomp})
modes = []
if os.path.exists(os.path.join(images, "files.img")):
    for e in load(os.path.join(images, "files.img"))["entries"]:
        if e.get("type") == "REG" and e["reg"].get("name") == "/" and "mode" in e["reg"]:
            modes.append(e["reg"]["mode"])
mounts = []
for path in sorted(glob.glob(os.path.join(images, "mountpoints-*.img"))):
    for e in load(path)["entries"]:
        mounts.append(dict(e, image=os.path.basename(path)))
json.dump({"creds": creds, "root_mode": modes[0] if modes else None, "mounts": mounts}, sys.stdout,
          default=str)
"""


def prepare_restore_images(images_dir: Path, hostname: str) -> RestoreImageFacts:
    """Set the restored hostname in the images and read what restore must check in them."""
    python = Path(CRIT).read_text(errors="replace").splitlines()[0].removeprefix("#!").strip() \
        if Path(CRIT).exists() else ""
    if not python:
        raise CritError(f"{CRIT} (python3-pycriu) is not installed: cannot read CRIU images")
    proc = subprocess.run([python, "-c", _PREPARE_SCRIPT, str(images_dir), hostname], capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        raise CritError(f"cannot decode the checkpoint's CRIU images: {proc.stderr.strip()[-300:]}")
    doc = json.loads(proc.stdout)
    try:
        mounts = tuple(ImageMount.from_entry(e) for e in doc.get("mounts") or [])
    except (KeyError, TypeError, ValueError) as e:
        raise CritError(f"the checkpoint's mountpoints image is malformed: {e}") from None
    return RestoreImageFacts([_credentials(item) for item in doc["creds"]],
                             int(doc["root_mode"]) if doc["root_mode"] is not None else None, mounts)


def _credentials(item: dict) -> ProcessCredentials:
    c = item["creds"]
    caps: set[str] = set()
    for key in ("cap_inh", "cap_prm", "cap_eff", "cap_bnd", "cap_amb"):
        caps |= _cap_names(c.get(key) or [])
    return ProcessCredentials(
        image=item["image"], uids=tuple(int(c.get(k, 0)) for k in ("uid", "euid", "suid", "fsuid")),
        gids=tuple(int(c.get(k, 0)) for k in ("gid", "egid", "sgid", "fsgid")), capabilities=frozenset(caps),
        seccomp_mode=_seccomp_mode(item.get("seccomp", "disabled"), item["image"]))


def _seccomp_mode(value, image: str) -> SeccompMode | None:
    """crit prints the enum's name ("filter"); a number is accepted too."""
    if value is None:
        return None
    try:
        return SeccompMode[value.upper()] if isinstance(value, str) else SeccompMode(int(value))
    except (KeyError, ValueError, TypeError):
        raise CritError(f"{image}: unknown seccomp mode {value!r}") from None
