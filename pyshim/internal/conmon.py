"""The one place pyshim runs conmon, the per-container monitor.

Why conmon (and not a Python shim): it is what CRI-O uses, so its behaviour under CRIU is proven;
it keeps the container's stdio as pipes (CRIU refuses host files), writes the CRI log format that
kubelet and `crictl logs` read, records the exit code in a file that survives our restarts, keeps
an attach socket (needed for the streaming issue), and costs about 1 MiB per container where a
Python monitor would cost ~10 MiB.

Protocol (as CRI-O speaks it): conmon gets a sync pipe (_OCI_SYNCPIPE) on which it reports
`{"data": <pid>}` or `{"data": -1, "message": "..."}` once `runc create` is done, and a start pipe
(_OCI_STARTPIPE) it waits on before doing anything, so the caller can place it first.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pyshim.errors import DeadlineExceeded
from pyshim.internal import proctree
from pyshim.internal.runc import RuncError

# conmon's control fifo message types (CRI-O's WIN_RESIZE_EVENT and REOPEN_LOGS_EVENT).
_WIN_RESIZE_EVENT = 1
_REOPEN_LOGS_EVENT = 2
_REOPEN_POLL_INTERVAL = 0.005


@dataclass(frozen=True)
class MonitorPaths:
    bundle: Path
    exit_dir: Path
    persist_dir: Path
    attach_dir: Path

    @property
    def conmon_pidfile(self) -> Path:
        return self.bundle / "conmon.pid"

    @property
    def container_pidfile(self) -> Path:
        return self.bundle / "pidfile"

    @property
    def control_fifo(self) -> Path:
        return self.bundle / "ctl"

    @property
    def attach_socket(self) -> Path:
        """conmon's SOCK_SEQPACKET attach socket: it links <socket-dir>/<id> to the bundle and binds
        `attach` there. Each packet it sends is one byte of pipe (2 stdout, 3 stderr) and the data;
        what it receives goes to the container's stdin (with --stdin)."""
        return self.bundle / "attach"


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """What tells a file from the one that was at `path` before: its inode and change time
    (the inode alone could be reused once the old file is deleted)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


class Conmon:
    def __init__(self, binary: str, runc_binary: str, runc_root: Path, log_level: str = "info"):
        self.binary = binary
        self.runc_binary = runc_binary
        self.runc_root = Path(runc_root)
        self.log_level = "debug" if log_level == "debug" else "info"

    def create(self, container_id: str, name: str, paths: MonitorPaths, log_path: str,
               stdin: bool = False, tty: bool = False, timeout: float = 60, stdin_once: bool = False,
               restore_from: Path | None = None, restore_args: tuple[str, ...] = ()) -> int:
        """Start conmon, which runs `runc create` (or `runc restore`); returns the container's pid."""
        paths.persist_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary, "--api-version", "1",
            "-c", container_id, "-u", container_id, "-n", name,
            "-r", self.runc_binary, "--runtime-arg", f"--root={self.runc_root}",
            "-b", str(paths.bundle),
            "-p", str(paths.container_pidfile), "-P", str(paths.conmon_pidfile),
            "--exit-dir", str(paths.exit_dir), "--persist-dir", str(paths.persist_dir),
            "--socket-dir-path", str(paths.attach_dir),
            "--log-level", self.log_level, "--syslog",
        ]
        # conmon needs a log path; without one from the request the output still goes somewhere readable.
        args += ["-l", f"k8s-file:{log_path or (paths.bundle / 'container.log')}"]
        if stdin:
            args.append("--stdin")
            if not stdin_once:
                # Kubernetes' default: stdin stays open for the next attach when one client leaves.
                args.append("--leave-stdin-open")
        if tty:
            args.append("--terminal")
        if restore_from is not None:
            args += ["--restore", str(restore_from)]
            for extra in restore_args:
                args += ["--runtime-opt", extra]
        # conmon writes some files (an `oom` marker after an OOM kill) relative to its working
        # directory, as CRI-O runs it in the bundle: give it the container's own directory, never the
        # daemon's.
        return self._spawn(args, timeout, cwd=paths.bundle, conmon_pidfile=paths.conmon_pidfile)

    def _spawn(self, args: list[str], timeout: float, cwd: Path, conmon_pidfile: Path) -> int:
        sync_r, sync_w = os.pipe()
        start_r, start_w = os.pipe()
        # conmon reads the fd numbers from its environment, so the pipes keep their own numbers:
        # no dup2 in a preexec_fn, which is unsafe in a threaded daemon.
        env = dict(os.environ, _OCI_SYNCPIPE=str(sync_w), _OCI_STARTPIPE=str(start_r))
        try:
            # conmon's stdout/stderr must not be pipes we close: it would die of SIGPIPE before
            # writing the exit file. It logs to syslog instead.
            proc = subprocess.Popen(args, env=env, pass_fds=(sync_w, start_r), cwd=cwd,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            for fd in (sync_r, sync_w, start_r, start_w):
                os.close(fd)
            raise RuncError(f"cannot start conmon {args[0]}: {e}") from None
        os.close(sync_w)
        os.close(start_r)
        try:
            try:
                os.write(start_w, b"\0")
            except BrokenPipeError:
                pass  # conmon already exited (a failed restore does not wait): the sync pipe says why
            os.close(start_w)
            # The first conmon process forks the monitor and exits at once; reap it.
            proc.wait(timeout=timeout)
            report = self._read_sync(sync_r, timeout)
        except (RuncError, subprocess.TimeoutExpired, ValueError) as e:
            # No container to hand back: whatever conmon started (its monitor, a `runc create` or
            # `runc restore` still busy, `runc init`) must not live on as a zombie or spin a core.
            proctree.kill_family([proc.pid, *_pid_in(conmon_pidfile)], sessions=[proc.pid])
            proc.wait()
            if isinstance(e, RuncError):
                raise
            raise RuncError(f"conmon did not start the container within {timeout}s: {e}") from None
        finally:
            os.close(sync_r)
        pid = int(report.get("data", -1))
        if pid <= 0:
            message = report.get("message", "").strip() or "conmon reported no pid"
            raise RuncError(_clean_runtime_message(message))
        return pid

    @staticmethod
    def _read_sync(fd: int, timeout: float) -> dict:
        import select

        chunks = b""
        while True:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                raise RuncError(f"conmon did not report within {timeout}s")
            data = os.read(fd, 65536)
            if not data:
                break
            chunks += data
            if chunks.endswith(b"\n") or chunks.endswith(b"}"):
                try:
                    return json.loads(chunks.splitlines()[0])
                except ValueError:
                    continue
        if not chunks:
            raise RuncError("conmon exited without reporting (see syslog for its messages)")
        return json.loads(chunks.splitlines()[0])

    @staticmethod
    def reopen_log(paths: MonitorPaths, log_path: Path, timeout: float) -> None:
        """Ask conmon to reopen the log file (after kubelet rotated it) and wait until it has.

        conmon writes a new file beside the log and renames it over `log_path`, so the file there is
        another one once it is done. kubelet (and critest) look for that file as soon as the call
        returns: returning before conmon got round to it loses that race. DeadlineExceeded after
        `timeout` seconds."""
        before = _file_identity(log_path)
        fd = os.open(paths.control_fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, f"{_REOPEN_LOGS_EVENT} 0 0\n".encode())
        finally:
            os.close(fd)
        deadline = time.monotonic() + timeout
        while _file_identity(log_path) in (None, before):
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"conmon did not reopen the log {log_path} within {timeout:.1f}s")
            time.sleep(_REOPEN_POLL_INTERVAL)

    @staticmethod
    def resize_terminal(paths: MonitorPaths, width: int, height: int) -> None:
        """Set the container's terminal size (conmon --terminal) through the control fifo."""
        fd = os.open(paths.control_fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, f"{_WIN_RESIZE_EVENT} {height} {width}\n".encode())
        finally:
            os.close(fd)

    @staticmethod
    def exit_code(paths: MonitorPaths, container_id: str) -> tuple[int, float] | None:
        """The exit code conmon recorded and when; None while the container has not exited."""
        path = paths.exit_dir / container_id
        try:
            text = path.read_text().strip()
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        if not text:
            return None
        return int(text), mtime


def _pid_in(pidfile: Path) -> list[int]:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return []
    return [int(text)] if text.isdigit() else []


def _clean_runtime_message(message: str) -> str:
    """conmon passes runc's stderr through; keep runc's own message."""
    for marker in ('msg="', "msg="):
        if marker in message:
            return message.split(marker, 1)[1].rstrip('"\n ').replace('\\"', '"')
    return message
