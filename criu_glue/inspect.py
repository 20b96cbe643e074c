"""`pyshim checkpoint inspect`: what a container checkpoint archive holds, in the manner of
checkpointctl's `show` (one table row per archive) and `inspect` (process tree, open files,
memory sizes).

The archive is untrusted input. Its metadata is read through criu_glue.archive; its CRIU images
are unpacked (size-bounded, never the memory pages themselves when the archive reader can skip
them) into a private temporary directory that is removed whatever happens, and decoded by CRIU's
own `crit` in subprocesses (`crit decode -i IMAGE`: JSON on stdout). pycriu is never imported
here: it needs Debian's protobuf on the system Python, not the project's.

Engine detection follows checkpointctl: spec.dump annotation `io.container.manager` = `libpod`
is Podman, `cri-o` is CRI-O (its `io.kubernetes.cri-o.Metadata` must be valid JSON), anything
else reads the containerd-style `io.kubernetes.cri.*` annotations. pyshim writes those same
annotations, so a pyshim archive is told apart by config.dump key `engine` = `pyshim`
(PYSHIM_ENGINE_KEY/VALUE; unknown config.dump keys are ignored by the other engines).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import quopri
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from oci.tree_removal import remove_tree

from . import archive_format as fmt
from .archive import CheckpointArchive, open_archive
from .errors import ArchiveError, ArchiveFormatError
from .limits import Budget, Limits
from .tarstream import copy_exactly, corrupt_stream_errors, decompressed, member_name, members, open_tar

CRIT = "/usr/bin/crit"
CRIT_TIMEOUT_SECONDS = 120
CRIT_JOBS = 8
# CRIU images do not record the page size; like checkpointctl, assume the inspecting host's.
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

ENGINE_PODMAN = "Podman"
ENGINE_CRIO = "CRI-O"
ENGINE_CONTAINERD = "containerd"
ENGINE_PYSHIM = "pyshim"
# The config.dump key and value by which pyshim marks its own archives.
PYSHIM_ENGINE_KEY = "engine"
PYSHIM_ENGINE_VALUE = "pyshim"

# spec.dump annotations checkpointctl reads.
ANN_MANAGER = "io.container.manager"
ANN_CRIO_METADATA = "io.kubernetes.cri-o.Metadata"
ANN_CRIO_IP = "io.kubernetes.cri-o.IP.0"
ANN_CRIO_CREATED = "io.kubernetes.cri-o.Created"
ANN_POD_NAME = "io.kubernetes.pod.name"
ANN_POD_NAMESPACE = "io.kubernetes.pod.namespace"
ANN_CRI_CONTAINER_NAME = "io.kubernetes.cri.container-name"
ANN_CRI_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
ANN_CRI_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"

PAGES_PREFIX = "pages-"
# Images inspection never reads: memory contents (the pagemap has the sizes). Skipping them
# keeps inspecting a many-GiB checkpoint cheap in time and disk.
_SKIPPED_IMAGE_PREFIXES = (PAGES_PREFIX, "amdgpu-pages-", "pages-shmem-")
# What the unpacked metadata images of one archive may take at most.
INSPECT_LIMITS = Limits(max_total_bytes=8 << 30, max_entries=200_000)


class InspectError(ArchiveError):
    """The CRIU images could not be read (crit missing or failing, pstree.img absent or bad)."""


# ---------------------------------------------------------------- data

@dataclass
class ArchiveSummary:
    """What `checkpointctl show` prints about one archive, and a little more."""
    archive: str
    engine: str
    container_name: str
    container_id: str
    pod_name: str
    namespace: str
    image_name: str        # config.dump rootfsImageName, else rootfsImage
    image_requested: str   # rootfsImage: the image as the user asked for it
    image_ref: str         # rootfsImageRef: image ID or NAME@DIGEST
    image_id: str          # rootfsImageRef when it is an image ID, else Podman's rootfsImageID, else ""
    runtime: str
    created: str           # RFC 3339 ("" when unknown)
    checkpointed: str
    created_time_ns: int | None
    checkpointed_time_ns: int | None
    restored: bool
    ip: str
    mac: str
    checkpoint_size: int   # regular files under checkpoint/
    memory_pages_size: int  # checkpoint/pages-*.img
    rootfs_diff_size: int
    archive_size: int      # the archive file as stored
    compression: str       # none, gzip or zstd


@dataclass
class OpenFile:
    fd: str    # "0", "1", ... or "cwd", "root", "exe"
    type: str  # CRIU file type: REG, PIPE, UNIXSK, INETSK, ...
    path: str  # a path or a description ("pipe[1234]", "tcp 0.0.0.0:80 (LISTEN)")


@dataclass
class MemoryInfo:
    vmas: int
    virtual_bytes: int     # sum of the regular VMAs' sizes
    shared_bytes: int      # anonymous shared and SysV IPC mappings (dumped separately)
    memory_bytes: int      # every page the pagemap lists (checkpointctl memparse's "memory size")
    image_bytes: int       # pages whose content is in this checkpoint's pages image
    parent_bytes: int      # pages left in a parent (pre-dump) image
    pages_image: str       # "pages-<id>.img"
    pages_image_size: int | None  # its size in the archive or on disk; None when unknown


@dataclass
class ProcessInfo:
    pid: int
    ppid: int
    command: str           # the kernel's comm
    pgid: int = 0
    sid: int = 0
    state: str = "alive"   # alive, dead (zombie), stopped, helper
    threads: list[int] = field(default_factory=list)
    children: list[int] = field(default_factory=list)
    depth: int = 0
    exe: str = ""
    files: list[OpenFile] | None = None
    memory: MemoryInfo | None = None


@dataclass
class ImagesReport:
    processes: list[ProcessInfo]  # depth-first, parents before children, siblings by PID
    page_size: int = PAGE_SIZE
    warnings: list[str] = field(default_factory=list)

    def find(self, pid: int) -> ProcessInfo | None:
        return next((p for p in self.processes if p.pid == pid), None)

    @property
    def roots(self) -> list[ProcessInfo]:
        return [p for p in self.processes if p.depth == 0]


# ---------------------------------------------------------------- crit

def crit_decode(image: Path, crit: str = CRIT) -> dict[str, Any]:
    """`crit decode -i IMAGE` as a dict ({"magic": ..., "entries": [...]})."""
    try:
        proc = subprocess.run([crit, "decode", "-i", str(image)], capture_output=True, text=True,
                              timeout=CRIT_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise InspectError(f"cannot decode CRIU images: {crit} is not installed (Debian package "
                           "criu / python3-pycriu)") from None
    except subprocess.TimeoutExpired:
        raise InspectError(f"crit decode {image.name} took longer than {CRIT_TIMEOUT_SECONDS}s") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise InspectError(f"crit cannot decode {image.name}: {detail}")
    try:
        doc = json.loads(proc.stdout)
    except ValueError as e:
        raise InspectError(f"crit decode {image.name} printed no JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise InspectError(f"crit decode {image.name}: unexpected output (no entries list)")
    return doc


class _Images:
    """Decodes each image of one directory at most once, several crit processes at a time."""

    def __init__(self, directory: Path, pool: ThreadPoolExecutor, crit: str):
        self.dir = directory
        self._pool = pool
        self._crit = crit
        self._futures: dict[str, Any] = {}

    def prefetch(self, *names: str) -> None:
        for name in names:
            if name not in self._futures:
                path = self.dir / name
                self._futures[name] = (self._pool.submit(crit_decode, path, self._crit)
                                       if path.is_file() else None)

    def entries(self, name: str) -> list[Any] | None:
        """The image's entries; None when the image is absent. InspectError when undecodable."""
        self.prefetch(name)
        future = self._futures[name]
        return None if future is None else future.result()["entries"]


_TASK_STATES = {1: "alive", 2: "dead", 3: "stopped", 4: "helper", 5: "thread"}
_PE_PARENT, _PE_LAZY, _PE_PRESENT = 1, 2, 4
_VMA_AREA_REGULAR = 1 << 0
_VMA_ANON_SHARED = 1 << 8
_VMA_AREA_SYSVIPC = 1 << 10


def _task_id(entry: dict, key: str) -> int:
    """pstree ids as crit writes them: `pid`, or `ns_pid` (a list, outermost first)."""
    value = entry.get(key)
    if value is None:
        listed = entry.get("ns_" + key) or [0]
        value = listed[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InspectError(f"pstree.img: {key} {value!r} is not a process id")
    return value


def inspect_images(images_dir: str | os.PathLike, *, files: bool = True, memory: bool = True,
                   image_sizes: Callable[[str], int | None] | None = None,
                   crit: str = CRIT, jobs: int = CRIT_JOBS) -> ImagesReport:
    """Process tree (pstree.img + core-*.img), and optionally open files (ids, fdinfo, fs,
    files.img) and memory sizes (mm-*.img, pagemap-*.img) of a CRIU image directory.

    image_sizes(name) gives the size of an image that is not on disk (the archive's pages
    images, which inspection does not unpack)."""
    directory = Path(images_dir)
    if not (directory / "pstree.img").is_file():
        raise InspectError(f"{directory} is not a CRIU image directory: pstree.img is missing")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        images = _Images(directory, pool, crit)
        images.prefetch("pstree.img", "inventory.img", *(["files.img"] if files or memory else []))
        pstree = images.entries("pstree.img") or []
        procs = _read_pstree(pstree)
        for p in procs.values():
            images.prefetch(f"core-{p.pid}.img")
            if files:
                images.prefetch(f"ids-{p.pid}.img", f"fs-{p.pid}.img")
            if memory:
                images.prefetch(f"mm-{p.pid}.img", f"pagemap-{p.pid}.img")
        report = ImagesReport(processes=[])
        for p in procs.values():
            _read_core(images, p, report)
        ordered = _tree_order(procs)
        if files or memory:
            file_table = _FileTable(images, report)
        if files:
            _read_files(images, ordered, file_table, report)
        if memory:
            for p in ordered:
                if p.state in ("alive", "stopped"):
                    p.memory, p.exe = _read_memory(images, p, file_table, image_sizes, report)
        report.processes = ordered
    return report


def _read_pstree(entries: list[Any]) -> dict[int, ProcessInfo]:
    procs: dict[int, ProcessInfo] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise InspectError("pstree.img: an entry is not an object")
        pid = _task_id(entry, "pid")
        if pid == 0 or pid in procs:
            raise InspectError(f"pstree.img: process id {pid} is zero or listed twice")
        threads = [t for t in entry.get("threads") or [] if isinstance(t, int) and not isinstance(t, bool)]
        procs[pid] = ProcessInfo(pid=pid, ppid=_task_id(entry, "ppid"), command="",
                                 pgid=_task_id(entry, "pgid"), sid=_task_id(entry, "sid"),
                                 threads=threads or [pid])
    if not procs:
        raise InspectError("pstree.img lists no process")
    return procs


def _read_core(images: _Images, p: ProcessInfo, report: ImagesReport) -> None:
    name = f"core-{p.pid}.img"
    try:
        entries = images.entries(name)
    except InspectError as e:
        report.warnings.append(str(e))
        entries = None
    if not entries:
        report.warnings.append(f"{name} is missing or empty: no command or state for PID {p.pid}")
        p.command = "?"
        return
    core = entries[0] if isinstance(entries[0], dict) else {}
    tc = core.get("tc") or {}
    comm = tc.get("comm") or (core.get("thread_core") or {}).get("comm") or "?"
    p.command = str(comm)
    p.state = _TASK_STATES.get(tc.get("task_state", 1), f"state {tc.get('task_state')}")


def _tree_order(procs: dict[int, ProcessInfo]) -> list[ProcessInfo]:
    """Parents before children; a PPID not in the tree (or a cycle) makes a root."""
    for p in procs.values():
        parent = procs.get(p.ppid)
        if parent is not None and parent is not p:
            parent.children.append(p.pid)
    for p in procs.values():
        p.children.sort()
    ordered: list[ProcessInfo] = []
    seen: set[int] = set()

    def walk(p: ProcessInfo, depth: int) -> None:
        stack = [(p, depth)]
        while stack:
            cur, d = stack.pop()
            if cur.pid in seen:
                continue
            seen.add(cur.pid)
            cur.depth = d
            ordered.append(cur)
            stack.extend((procs[c], d + 1) for c in reversed(cur.children))

    roots = sorted(pid for pid, p in procs.items() if p.ppid not in procs or p.ppid == pid)
    for pid in roots:
        walk(procs[pid], 0)
    for pid in sorted(procs):  # members of a parent cycle: shown as roots
        if pid not in seen:
            walk(procs[pid], 0)
    return ordered


# ---------------------------------------------------------------- files

_INET_FAMILIES = {2: 4, 10: 6}
_PROTOCOLS = {6: "tcp", 17: "udp", 136: "udplite", 132: "sctp", 1: "icmp", 58: "icmp6"}
_TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
               6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
_SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket"}
_ANON_INODES = {"EVENTFD": "anon_inode:[eventfd]", "EVENTPOLL": "anon_inode:[eventpoll]",
                "SIGNALFD": "anon_inode:[signalfd]", "TIMERFD": "anon_inode:[timerfd]",
                "INOTIFY": "anon_inode:inotify", "FANOTIFY": "anon_inode:[fanotify]",
                "BPFMAP": "anon_inode:bpf-map", "PIDFD": "anon_inode:[pidfd]"}


class _FileTable:
    """files.img (CRIU >= 3.15 keeps every file description there) by id."""

    def __init__(self, images: _Images, report: ImagesReport):
        try:
            entries = images.entries("files.img") or []
        except InspectError as e:
            report.warnings.append(str(e))
            entries = []
        self.by_id = {e.get("id"): e for e in entries if isinstance(e, dict)}

    def reg_path(self, fid: int) -> str:
        entry = self.by_id.get(fid) or {}
        return str((entry.get("reg") or {}).get("name", "")) or f"REG.{fid}"

    def describe(self, kind: str, fid: int) -> str:
        entry = self.by_id.get(fid)
        if entry is None:
            return f"{kind}.{fid}"
        body = next((v for k, v in entry.items() if k not in ("type", "id") and isinstance(v, dict)), {})
        try:
            return self._describe(kind, fid, body)
        except (KeyError, TypeError, ValueError, struct.error):
            return f"{kind}.{fid}"

    def _describe(self, kind: str, fid: int, body: dict) -> str:
        if kind == "REG":
            return str(body.get("name", "")) or f"REG.{fid}"
        if kind == "PIPE":
            return f"pipe[{body['pipe_id']}]"
        if kind == "FIFO":
            return f"fifo[{body['pipe_id']}] {self.reg_path(body['regf_id'])}"
        if kind == "UNIXSK":
            return _describe_unix(body)
        if kind == "INETSK":
            return _describe_inet(body)
        if kind == "PACKETSK":
            return f"packet socket (protocol {body.get('protocol', '?')})"
        if kind == "NETLINKSK":
            return f"netlink socket (protocol {body.get('protocol', '?')})"
        if kind == "TTY":
            return f"tty (index {body.get('index', '?')})"
        if kind in _ANON_INODES:
            return _ANON_INODES[kind]
        if kind == "MEMFD":
            return f"memfd (inode {body.get('inode_id', '?')})"
        return f"{kind}.{fid}"


def _describe_unix(body: dict) -> str:
    raw = body.get("name") or ""
    name = quopri.decodestring(raw.encode("latin-1", "replace")) if isinstance(raw, str) else b""
    if name.startswith(b"\0"):
        shown = "@" + name[1:].decode("utf-8", "replace")
    else:
        shown = name.decode("utf-8", "replace")
    kind = _SOCK_TYPES.get(body.get("type"), "socket")
    peer = f" -> [{body['peer']}]" if body.get("peer") else ""
    return f"unix {kind} {shown or '[' + str(body.get('ino', '?')) + ']'}{peer}".rstrip()


def _ip(words: list[int], version: int) -> str:
    # crit writes the address as the u32 words of the in-memory (network order) address.
    data = b"".join(struct.pack("<I", w & 0xFFFFFFFF) for w in words)
    return str(ipaddress.IPv4Address(data[:4]) if version == 4 else ipaddress.IPv6Address(data[:16].ljust(16, b"\0")))


def _describe_inet(body: dict) -> str:
    version = _INET_FAMILIES.get(body.get("family"), 4)
    proto = _PROTOCOLS.get(body.get("proto"), f"ip proto {body.get('proto')}")
    src = f"{_ip(body.get('src_addr') or [0], version)}:{body.get('src_port', 0)}"
    text = f"{proto}{'6' if version == 6 else ''} {src}"
    if body.get("dst_port") or any(body.get("dst_addr") or []):
        text += f" -> {_ip(body.get('dst_addr') or [0], version)}:{body.get('dst_port', 0)}"
    if proto == "tcp":
        text += f" ({_TCP_STATES.get(body.get('state'), body.get('state'))})"
    return text


def _read_files(images: _Images, procs: list[ProcessInfo], table: _FileTable, report: ImagesReport) -> None:
    inventory = (images.entries("inventory.img") or [{}])[0]
    per_id = bool(inventory.get("fdinfo_per_id", True)) if isinstance(inventory, dict) else True
    live = [p for p in procs if p.state in ("alive", "stopped")]
    files_ids: dict[int, int] = {}
    for p in live:
        ids = _first(images, f"ids-{p.pid}.img", report)
        files_id = ids.get("files_id") if per_id else p.pid
        if isinstance(files_id, int) and not isinstance(files_id, bool):
            files_ids[p.pid] = files_id
            images.prefetch(f"fdinfo-{files_id}.img")
    for p in live:
        found: list[OpenFile] = []
        if p.pid in files_ids:
            try:
                fdinfo = images.entries(f"fdinfo-{files_ids[p.pid]}.img")
            except InspectError as e:
                report.warnings.append(str(e))
                fdinfo = None
            if fdinfo is None:
                report.warnings.append(f"no fdinfo image for PID {p.pid}")
            for fd in sorted((e for e in fdinfo or [] if isinstance(e, dict)), key=lambda e: e.get("fd", 0)):
                kind = str(fd.get("type", "?"))
                found.append(OpenFile(str(fd.get("fd", "?")), kind, table.describe(kind, fd.get("id"))))
        fs = _first(images, f"fs-{p.pid}.img", report)
        for label, key in (("cwd", "cwd_id"), ("root", "root_id")):
            if key in fs:
                found.append(OpenFile(label, "REG", table.reg_path(fs[key])))
        p.files = found


def _first(images: _Images, name: str, report: ImagesReport) -> dict:
    try:
        entries = images.entries(name)
    except InspectError as e:
        report.warnings.append(str(e))
        return {}
    if not entries or not isinstance(entries[0], dict):
        report.warnings.append(f"{name} is missing or empty")
        return {}
    return entries[0]


# ---------------------------------------------------------------- memory

def _read_memory(images: _Images, p: ProcessInfo, table: _FileTable,
                 image_sizes: Callable[[str], int | None] | None,
                 report: ImagesReport) -> tuple[MemoryInfo | None, str]:
    mm = _first(images, f"mm-{p.pid}.img", report)
    vmas = [v for v in mm.get("vmas") or [] if isinstance(v, dict)]
    exe = table.reg_path(mm["exe_file_id"]) if isinstance(mm.get("exe_file_id"), int) else ""
    try:
        pagemap = images.entries(f"pagemap-{p.pid}.img")
    except InspectError as e:
        report.warnings.append(str(e))
        pagemap = None
    if not mm and pagemap is None:
        return None, exe
    virtual = shared = 0
    regular = 0
    for v in vmas:
        size = max(0, int(v.get("end", 0)) - int(v.get("start", 0)))
        status = int(v.get("status", 0))
        if status & _VMA_AREA_REGULAR:
            regular += 1
            virtual += size
        if status & (_VMA_ANON_SHARED | _VMA_AREA_SYSVIPC):
            shared += size
    total = in_image = in_parent = 0
    pages_id = None
    for entry in pagemap or []:
        if not isinstance(entry, dict):
            continue
        if "pages_id" in entry and "vaddr" not in entry:
            pages_id = entry["pages_id"]
            continue
        n = int(entry.get("nr_pages", 0)) + int(entry.get("compat_nr_pages", 0) or 0)
        flags = int(entry.get("flags", _PE_PRESENT))
        total += n
        if flags & _PE_PARENT:
            in_parent += n
        elif flags & _PE_PRESENT:
            in_image += n
    pages_image = f"{PAGES_PREFIX}{pages_id}.img" if isinstance(pages_id, int) else ""
    size = None
    if pages_image:
        on_disk = images.dir / pages_image
        if on_disk.is_file():
            size = on_disk.stat().st_size
        elif image_sizes is not None:
            size = image_sizes(pages_image)
    return MemoryInfo(vmas=regular, virtual_bytes=virtual, shared_bytes=shared,
                      memory_bytes=total * PAGE_SIZE, image_bytes=in_image * PAGE_SIZE,
                      parent_bytes=in_parent * PAGE_SIZE, pages_image=pages_image,
                      pages_image_size=size), exe


# ---------------------------------------------------------------- rendering

def human_size(n: int | None) -> str:
    """checkpointctl's ByteToString: "204 B", "130.8 KiB", "9.2 MiB"."""
    if n is None:
        return "?"
    if n < 1024:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """checkpointctl's tab-writer look: upper-case header, dashes, columns two spaces apart."""
    header = [h.upper() for h in header]
    widths = [max(len(str(c)) for c in col) for col in zip(header, ["-" * len(h) for h in header], *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * len(h) for h in header]), *(line(r) for r in rows)]


def _short_id(container_id: str) -> str:
    return container_id[:12]


def render_text(summary: ArchiveSummary, report: ImagesReport | None = None, *,
                ps: bool = True, files: bool = True, mem: bool = True) -> str:
    """One archive's block: checkpointctl show's table, the details it leaves out, and (with a
    report) the process tree, open files and memory sizes."""
    header = ["Container", "Image", "ID", "Runtime", "Created", "Engine"]
    row = [summary.container_name or "-", summary.image_name or "-", _short_id(summary.container_id) or "-",
           summary.runtime or "-", summary.created or "-", summary.engine]
    if summary.ip:
        header.append("IP")
        row.append(summary.ip)
    if summary.mac:
        header.append("MAC")
        row.append(summary.mac)
    header.append("CHKPT Size")
    row.append(human_size(summary.checkpoint_size))
    if summary.rootfs_diff_size:
        header.append("Root Fs Diff Size")
        row.append(human_size(summary.rootfs_diff_size))
    out = [f"Displaying container checkpoint data from {summary.archive}", "", *_table(header, [row]), ""]
    details = [("Pod", summary.pod_name), ("Namespace", summary.namespace),
               ("Container ID", summary.container_id),
               ("Image (requested)", summary.image_requested if summary.image_requested != summary.image_name else ""),
               ("Image ref", summary.image_ref),
               ("Image ID", summary.image_id if summary.image_id != summary.image_ref else ""),
               ("Checkpointed", summary.checkpointed),
               ("Restored", "yes" if summary.restored else ""),
               ("Memory pages size", human_size(summary.memory_pages_size) if summary.memory_pages_size else ""),
               ("Archive size", f"{human_size(summary.archive_size)} ({summary.compression})")]
    width = max(len(k) for k, _ in details) + 1
    out += [f"{(k + ':').ljust(width)} {v}" for k, v in details if v]
    if report is not None:
        if ps:
            out += ["", "Process tree", ""]
            rows = [[str(p.pid), str(p.ppid), str(p.pgid), str(p.sid), p.state, str(len(p.threads)),
                     ("  " * (p.depth - 1) + "└─ " if p.depth else "") + p.command]
                    for p in report.processes]
            out += _table(["PID", "PPID", "PGID", "SID", "State", "Threads", "Command"], rows)
        if files and any(p.files is not None for p in report.processes):
            out += ["", "Open files", ""]
            rows = [[str(p.pid), p.command, f.fd, f.type, f.path]
                    for p in report.processes for f in (p.files or [])]
            out += _table(["PID", "Command", "FD", "Type", "Path"], rows)
        if mem and any(p.memory is not None for p in report.processes):
            out += ["", "Memory", ""]
            rows = [[str(p.pid), p.command, str(m.vmas), human_size(m.virtual_bytes), human_size(m.memory_bytes),
                     human_size(m.shared_bytes), f"{m.pages_image} ({human_size(m.pages_image_size)})"
                     if m.pages_image else "-"]
                    for p in report.processes if (m := p.memory) is not None]
            out += _table(["PID", "Command", "VMAs", "Virtual size", "Memory size", "Shared memory size",
                           "Pages image"], rows)
        for w in report.warnings:
            out.append(f"warning: {w}")
    return "\n".join(out) + "\n"


def to_json(summary: ArchiveSummary, report: ImagesReport | None = None, *,
            ps: bool = True, files: bool = True, mem: bool = True) -> dict[str, Any]:
    """The --json form of one archive; keys follow checkpointctl's `inspect --format json`
    where it has them (container_name, image, id, runtime, created, checkpointed, engine, ip,
    checkpoint_size{total_size, memory_pages_size, root_fs_diff_size}, process_tree,
    file_descriptors). process_tree is the root process's node (a list only in the malformed
    case of several roots)."""
    doc: dict[str, Any] = {
        "archive": summary.archive, "container_name": summary.container_name, "image": summary.image_name,
        "id": summary.container_id, "runtime": summary.runtime, "created": summary.created,
        "checkpointed": summary.checkpointed, "engine": summary.engine, "ip": summary.ip, "mac": summary.mac,
        "pod_name": summary.pod_name, "namespace": summary.namespace,
        "image_requested": summary.image_requested, "image_ref": summary.image_ref, "image_id": summary.image_id,
        "restored": summary.restored, "compression": summary.compression, "archive_size": summary.archive_size,
        "checkpoint_size": {"total_size": summary.checkpoint_size, "memory_pages_size": summary.memory_pages_size,
                            "root_fs_diff_size": summary.rootfs_diff_size},
    }
    if report is None:
        return doc
    by_pid = {p.pid: p for p in report.processes}
    if ps:
        def node(p: ProcessInfo) -> dict[str, Any]:
            n: dict[str, Any] = {"pid": p.pid, "ppid": p.ppid, "pgid": p.pgid, "sid": p.sid,
                                 "command": p.command, "task_state": p.state, "threads": p.threads}
            if p.exe:
                n["exe"] = p.exe
            kids = [node(by_pid[c]) for c in p.children if c in by_pid and by_pid[c].depth == p.depth + 1]
            if kids:
                n["children"] = kids
            return n

        roots = [node(p) for p in report.roots]
        doc["process_tree"] = roots[0] if len(roots) == 1 else roots
    if files:
        doc["file_descriptors"] = [{"pid": p.pid, "open_files": [asdict(f) for f in p.files]}
                                   for p in report.processes if p.files is not None]
    if mem:
        doc["memory"] = [{"pid": p.pid, "command": p.command, **asdict(p.memory)}
                         for p in report.processes if p.memory is not None]
    if report.warnings:
        doc["warnings"] = list(report.warnings)
    return doc


# ---------------------------------------------------------------- archives

def _rfc3339(ns: int | None) -> str:
    """Go's time.RFC3339 (whole seconds, UTC) as checkpointctl prints config.dump times."""
    if ns is None:
        return ""
    return fmt.format_rfc3339_ns(ns - ns % 1_000_000_000)


def _podman_network(raw: bytes | None) -> tuple[str, str]:
    """(ip/prefix, mac) of the first interface in Podman's network.status, the "podman"
    network first; empty when absent or unreadable (checkpointctl shows nothing then)."""
    if not raw:
        return "", ""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "", ""
    if not isinstance(doc, dict):
        return "", ""
    for net in sorted(doc, key=lambda n: (n != "podman", n)):
        interfaces = (doc[net] or {}).get("interfaces") if isinstance(doc[net], dict) else None
        if not isinstance(interfaces, dict):
            continue
        for ifname in sorted(interfaces):
            info = interfaces[ifname]
            subnets = info.get("subnets") if isinstance(info, dict) else None
            if isinstance(subnets, list) and subnets and isinstance(subnets[0], dict):
                return str(subnets[0].get("ipnet", "")), str(info.get("mac_address", ""))
    return "", ""


def _engine_info(archive: CheckpointArchive) -> dict[str, str]:
    """engine, container_name, pod_name, namespace, created, ip, mac: checkpointctl's
    getContainerInfo, plus pyshim."""
    config = archive.config()
    annotations = archive.spec().get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ArchiveFormatError(str(archive.path), f"{fmt.SPEC_DUMP}: annotations is not an object")
    ann = {k: v for k, v in annotations.items() if isinstance(v, str)}
    created = _rfc3339(config.created_time_ns)
    manager = ann.get(ANN_MANAGER)
    if manager == "libpod":
        ip, mac = _podman_network(archive.metadata_member(fmt.NETWORK_STATUS))
        return dict(engine=ENGINE_PODMAN, container_name=config.name, pod_name="", namespace="",
                    created=created, ip=ip, mac=mac)
    if manager == "cri-o":
        try:
            meta = json.loads(ann.get(ANN_CRIO_METADATA, ""))
        except (ValueError, RecursionError):
            meta = None
        if not isinstance(meta, dict):
            raise ArchiveFormatError(str(archive.path), f"{fmt.SPEC_DUMP}: annotation {ANN_CRIO_METADATA} "
                                     "is not a JSON object (CRI-O archives carry the container metadata there)")
        return dict(engine=ENGINE_CRIO, container_name=str(meta.get("name", "")),
                    pod_name=ann.get(ANN_POD_NAME, ""), namespace=ann.get(ANN_POD_NAMESPACE, ""),
                    created=ann.get(ANN_CRIO_CREATED, "") or created, ip=ann.get(ANN_CRIO_IP, ""), mac="")
    pyshim = str(config.extra.get(PYSHIM_ENGINE_KEY, "")).lower() == PYSHIM_ENGINE_VALUE
    return dict(engine=ENGINE_PYSHIM if pyshim else ENGINE_CONTAINERD,
                container_name=ann.get(ANN_CRI_CONTAINER_NAME, "") or config.name,
                pod_name=ann.get(ANN_CRI_SANDBOX_NAME, ""), namespace=ann.get(ANN_CRI_SANDBOX_NAMESPACE, ""),
                created=created, ip="", mac="")


def summary_of(archive: CheckpointArchive) -> ArchiveSummary:
    """The summary of an already opened archive."""
    config = archive.config()
    info = _engine_info(archive)
    ref = config.rootfs_image_ref
    pages = sum(archive.member_size(n) for n in archive.member_names()
                if n.startswith(f"{fmt.CHECKPOINT_DIR}/{PAGES_PREFIX}"))
    try:
        archive_size = os.stat(archive.path).st_size
    except OSError:
        archive_size = 0
    return ArchiveSummary(
        archive=str(archive.path), container_id=config.id,
        image_name=config.rootfs_image_name or config.rootfs_image, image_requested=config.rootfs_image,
        image_ref=ref, image_id=config.image_id, runtime=config.runtime,
        checkpointed=_rfc3339(config.checkpointed_time_ns), created_time_ns=config.created_time_ns,
        checkpointed_time_ns=config.checkpointed_time_ns, restored=config.restored,
        checkpoint_size=archive.checkpoint_size(), memory_pages_size=pages,
        rootfs_diff_size=archive.rootfs_diff_size(), archive_size=archive_size,
        compression=archive.compression, **info)


def summarize(path: str | os.PathLike) -> ArchiveSummary:
    """What `checkpointctl show` reports of one archive. ArchiveError (ArchiveFormatError for a
    file that is not a checkpoint archive or lacks config.dump/spec.dump/CRIU images) or
    OSError (missing, unreadable) on failure."""
    with open_archive(Path(path)) as archive:
        return summary_of(archive)


def extract_images_for_inspection(archive: CheckpointArchive, dest: Path,
                                  limits: Limits = INSPECT_LIMITS) -> int:
    """Unpack the CRIU images of checkpoint/ into the empty private directory `dest`, all but
    memory contents (pages-*.img); one pass over the archive, stopped after the last image.

    CheckpointArchive.extract_checkpoint_images would unpack the pages too: the whole of the
    container's memory, which inspection does not need."""
    label = str(archive.path)
    prefix = fmt.CHECKPOINT_DIR + "/"
    pending = {n for n in archive.member_names() if n.startswith(prefix)}
    budget = Budget(limits, label)
    try:
        with open(archive.path, "rb") as raw, decompressed(raw, archive.compression) as stream, \
                open_tar(stream, seekable=archive.compression == "none") as tar:
            for member in members(tar):
                if not pending:
                    break  # the rest is rootfs diff and logs: not worth decompressing
                name = member_name(member, label)
                if not name.startswith(prefix):
                    continue
                pending.discard(name)
                rel = name[len(prefix):]
                # CRIU writes a flat directory of regular files; anything else is not for us.
                if not member.isreg() or "/" in rel or rel in ("", ".", "..") \
                        or rel.startswith(_SKIPPED_IMAGE_PREFIXES):
                    continue
                budget.charge_entry(name, member.size)
                fd = os.open(dest / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600)
                with os.fdopen(fd, "wb") as out:
                    copy_exactly(tar.extractfile(member), out, member.size, f"{label} member {name!r}")
    except corrupt_stream_errors() as e:
        raise ArchiveFormatError(label, f"not a readable (compressed) tar archive: {e}") from None
    return budget.total_bytes


def inspect_archive(path: str | os.PathLike, *, files: bool = True, memory: bool = True,
                    limits: Limits = INSPECT_LIMITS, crit: str = CRIT) -> tuple[ArchiveSummary, ImagesReport]:
    """summarize() plus inspect_images() of the archive's CRIU images, unpacked into a private
    temporary directory that is removed before returning (or raising)."""
    with open_archive(Path(path)) as archive:
        summary = summary_of(archive)
        work = Path(tempfile.mkdtemp(prefix="pyshim-inspect-"))  # mode 0700
        try:
            extract_images_for_inspection(archive, work, limits)

            def size_in_archive(image: str) -> int | None:
                member = f"{fmt.CHECKPOINT_DIR}/{image}"
                return archive.member_size(member) if archive.has_member(member) else None

            report = inspect_images(work, files=files, memory=memory, image_sizes=size_in_archive, crit=crit)
        finally:
            remove_tree(work, ignore_errors=True)
    return summary, report


# ---------------------------------------------------------------- command line

def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Show what container checkpoint archives hold (like checkpointctl show/inspect).")
    p.add_argument("archives", nargs="+", metavar="archive", help="checkpoint archive (tar, tar.gz or tar.zst)")
    p.add_argument("--ps", action="store_true", help="show the process tree")
    p.add_argument("--files", action="store_true", help="show the open files of each process")
    p.add_argument("--mem", action="store_true", help="show the memory sizes of each process")
    p.add_argument("--all", action="store_true", help="--ps --files --mem")
    p.add_argument("--json", action="store_true", help="print JSON (a list, one object per archive)")
    return p


def main(argv: list[str] | None = None, prog: str = "pyshim checkpoint inspect") -> int:
    """0 when every archive was shown; 1 (message on stderr) when any could not be read."""
    args = _parser(prog).parse_args(argv)
    ps, files, mem = args.ps or args.all, args.files or args.all, args.mem or args.all
    detail = ps or files or mem
    failed = False
    docs: list[dict[str, Any]] = []
    blocks: list[str] = []
    for path in args.archives:
        try:
            if detail:
                summary, report = inspect_archive(path, files=files, memory=mem)
            else:
                summary, report = summarize(path), None
        except FileNotFoundError:
            print(f"{prog}: {path}: no such file", file=sys.stderr)
            failed = True
            continue
        except IsADirectoryError:
            print(f"{prog}: {path}: is a directory, not a checkpoint archive", file=sys.stderr)
            failed = True
            continue
        except (ArchiveError, OSError) as e:
            print(f"{prog}: {getattr(e, 'message', None) or e}", file=sys.stderr)
            failed = True
            continue
        if args.json:
            docs.append(to_json(summary, report, ps=ps, files=files, mem=mem))
        else:
            blocks.append(render_text(summary, report, ps=ps, files=files, mem=mem))
    try:
        if args.json:
            print(json.dumps(docs, indent=2, ensure_ascii=False))
        elif blocks:
            sys.stdout.write("\n".join(blocks))
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`
        return 1 if failed else 0
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
