"""Thin adapter for CRIU's lazy-pages daemon (`criu lazy-pages`), the page source of a post-copy restore.

A restore with `runc restore --lazy-pages` brings the process tree back without its anonymous memory:
CRIU registers that memory with userfaultfd and hands each process's uffd to the lazy-pages daemon
over a unix socket, `lazy-pages.socket`, in its work directory (relative: CRIU chdirs there, so the
daemon's `-W` and runc's `--work-path` must be the same directory). The daemon answers page faults
first and copies the rest in the background, from the checkpoint's page images (a local restore) or
from a CRIU page server on another node (`--page-server --address A --port P`: a lazy migration).
It exits once every page of every process is in place, or every process has exited.

Proven by hand on this machine (runc 1.1.5, CRIU 4.2.1, kernel 6.18):

    criu lazy-pages -D IMAGES -W WORK -o lazy-pages.log -v4 --status-fd N   # N gets one byte when listening
    runc restore -d --image-path IMAGES --work-path WORK --lazy-pages ID

If the daemon dies while `runc restore` runs, CRIU's restore can hang: callers bound it with a
timeout. If it dies after the restore, the process's missing pages can never arrive (an unhandled
fault after the uffd is closed reads zeroes): the process must be killed, never left running.

The progress lines (`uffd_copy`, `Found N pages`, `UFFD transferred pages`) are CRIU debug lines, so
the daemon logs at -v4; the log grows with the number of chunks copied (at most 4 MiB each), not pages.
"""
from __future__ import annotations

import os
import re
import select
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .criu import log_excerpt
from .errors import ArchiveError
from .procfs import live_pids, process_argv

SOCKET_NAME = "lazy-pages.socket"  # CRIU's LAZY_PAGES_SOCK_NAME, fixed, in the work directory
LOG_NAME = "lazy-pages.log"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# runc's flag for a restore whose memory comes from the daemon.
RUNC_RESTORE_ARGS = ("--lazy-pages",)


class LazyPagesError(ArchiveError):
    """The lazy-pages daemon could not be started (or was not ready in time); carries CRIU's log lines."""


@dataclass(frozen=True)
class PageServer:
    """Where a lazy migration's pages are served from: a CRIU page server on the source node."""
    address: str
    port: int

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> "PageServer":
        """`ADDR:PORT` or `[V6ADDR]:PORT`; ValueError naming what is wrong."""
        text = text.strip()
        if text.startswith("["):
            address, sep, port = text[1:].partition("]:")
        else:
            address, sep, port = text.rpartition(":")
        if not sep or not address or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r} is not ADDRESS:PORT")
        import ipaddress

        ipaddress.ip_address(address)  # a numeric address: CRIU does not resolve names
        return cls(address, int(port))


def lazy_pages_command(criu: str, images_dir: Path, work_dir: Path, status_fd: int,
                       page_server: PageServer | None = None) -> list[str]:
    cmd = [criu, "lazy-pages", "-D", str(images_dir), "-W", str(work_dir), "-o", LOG_NAME, "-v4",
           "--status-fd", str(status_fd)]
    if page_server is not None:
        cmd += ["--page-server", "--address", page_server.address, "--port", str(page_server.port)]
    return cmd


class StartingDaemon:
    """A lazy-pages daemon started and not yet known to listen: the caller does other work meanwhile
    (its start-up overlaps the rest of the restore's preparation), then wait_ready() before `runc
    restore`, or abandon()."""

    def __init__(self, proc: subprocess.Popen, ready_fd: int, work_dir: Path):
        self.proc = proc
        self._ready_fd = ready_fd
        self._work_dir = work_dir

    def wait_ready(self, timeout: float) -> subprocess.Popen:
        """Until it listens on `work_dir/lazy-pages.socket` (its status byte). LazyPagesError, with the
        daemon killed and reaped, when it exits or is not ready in time."""
        try:
            ready, _, _ = select.select([self._ready_fd], [], [], timeout)
            byte = os.read(self._ready_fd, 1) if ready else b""
        finally:
            self._close()
        if byte == b"\0":
            return self.proc
        stop(self.proc)
        why = "exited" if ready else f"was not ready within {timeout:.0f}s"
        raise LazyPagesError(f"criu lazy-pages {why} (exit {self.proc.returncode}); its log ({LOG_NAME}):\n"
                             f"{log_excerpt(self._work_dir / LOG_NAME)}")

    def abandon(self) -> None:
        """Not needed after all (the restore failed before it ran): killed and reaped."""
        self._close()
        stop(self.proc)

    def _close(self) -> None:
        if self._ready_fd >= 0:
            os.close(self._ready_fd)
            self._ready_fd = -1


def launch_lazy_pages(images_dir: Path, work_dir: Path, page_server: PageServer | None = None,
                      criu: str = "criu") -> StartingDaemon:
    """Start the daemon in a session of its own (a daemon of ours that dies must not take the
    workload's page source with it); it reads the images' inventory and process tree at once, so they
    must be in `images_dir`. LazyPagesError when it cannot be started."""
    ready_r, ready_w = os.pipe()
    try:
        proc = subprocess.Popen(lazy_pages_command(criu, images_dir, work_dir, ready_w, page_server),
                                cwd=work_dir, pass_fds=(ready_w,), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as e:
        os.close(ready_r)
        raise LazyPagesError(f"cannot start {criu} lazy-pages: {e}") from None
    finally:
        os.close(ready_w)
    return StartingDaemon(proc, ready_r, work_dir)


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL the daemon (its session holds nothing else) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
    proc.wait()


def is_lazy_pages_daemon(pid: int, work_dir: Path) -> bool:
    """`pid` is alive and is the lazy-pages daemon serving `work_dir` (not a reused pid)."""
    argv = process_argv(pid)
    return argv is not None and b"lazy-pages" in argv and str(work_dir).encode() in argv


def find_daemons(work_dirs_under: Path) -> dict[int, Path]:
    """Every live lazy-pages daemon whose work directory lies under `work_dirs_under`, by pid."""
    found: dict[int, Path] = {}
    prefix = str(work_dirs_under).rstrip("/") + "/"
    for pid in live_pids():
        argv = process_argv(pid)
        if argv is None or b"lazy-pages" not in argv or b"-W" not in argv:
            continue
        index = argv.index(b"-W") + 1
        work = argv[index].decode(errors="replace") if index < len(argv) else ""
        if work.startswith(prefix):
            found[pid] = Path(work)
    return found


# ---- progress, read from the daemon's log ---------------------------------------------------------

_LINE = re.compile(rb"uffd: (\d+)-(-?\d+): (.*)")
_FOUND = re.compile(rb"Found (\d+) pages to be handled by UFFD")
_COPY = re.compile(rb"uffd_copy: 0x[0-9a-f]+/(\d+)")
_DONE = re.compile(rb"UFFD transferred pages: \((\d+)/(\d+)\)")


@dataclass
class LazyProgress:
    """What the daemon's log says so far: bytes to bring, bytes brought, per restored process."""
    total_bytes: int = 0
    copied_bytes: int = 0
    processes: set[int] = field(default_factory=set)   # pids (in the images) that handed over a uffd
    finished: set[int] = field(default_factory=set)    # pids whose transfer the daemon summed up
    exited: set[int] = field(default_factory=set)      # pids that exited (their pages are not needed)
    errors: list[str] = field(default_factory=list)

    @property
    def all_transferred(self) -> bool:
        """The log's own verdict, for a daemon whose exit status we cannot read (adopted after a
        restart): every process that handed over a uffd was summed up (its pages all copied, or it
        exited and needs none), and CRIU logged no error. A daemon we started is judged by its exit
        status: CRIU's handle_requests only returns 0 when that holds."""
        return bool(self.processes) and self.processes <= self.finished and not self.errors


class ProgressReader:
    """Reads the daemon's log incrementally (only what was appended since the last call). Thread-safe:
    status calls and the watcher may read at once, and each appended line must be counted once."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.progress = LazyProgress()
        self._offset = 0
        self._partial = b""
        self._lock = threading.Lock()

    def read(self) -> LazyProgress:
        with self._lock:
            return self._read()

    def _read(self) -> LazyProgress:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.progress
        self._offset += len(data)
        data, self._partial = self._partial + data, b""
        lines = data.split(b"\n")
        if lines and not data.endswith(b"\n"):
            self._partial = lines.pop()
        for line in lines:
            self._line(line)
        return self.progress

    def _line(self, line: bytes) -> None:
        p = self.progress
        if b"Error (" in line:
            p.errors.append(line.decode(errors="replace").strip())
            return
        m = _LINE.search(line)
        if not m:
            return
        pid, rest = int(m.group(1)), m.group(3)
        if (c := _COPY.search(rest)) is not None:
            p.copied_bytes += int(c.group(1))
        elif rest.startswith(b"zero page at"):
            p.copied_bytes += PAGE_SIZE
        elif (f := _FOUND.search(rest)) is not None:
            p.processes.add(pid)
            p.total_bytes += int(f.group(1)) * PAGE_SIZE
        elif (d := _DONE.search(rest)) is not None:
            p.finished.add(pid)
        elif rest.strip() == b"EXIT":
            p.exited.add(pid)

