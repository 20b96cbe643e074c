"""The one place pyshim runs runc. Each method is one runc command; errors carry runc's message."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pyshim.errors import Internal
from pyshim.internal import proctree


class RuncError(Internal):
    """runc failed; the message is runc's own stderr (its error line), prefixed with the command."""


@dataclass(frozen=True)
class RuncState:
    id: str
    pid: int
    status: str  # created, running, paused, stopped
    bundle: str


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


# How long runc gets to reap the exec'd process we killed at an ExecSync timeout.
EXEC_REAP_SECONDS = 2.0


def _runc_message(stderr: bytes) -> str:
    """runc logs JSON-ish `level=error msg="..."` lines; the last error line is the useful one."""
    text = stderr.decode(errors="replace").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "level=error" in line and 'msg="' in line:
            return line.split('msg="', 1)[1].rstrip('"').replace('\\"', '"')
    return lines[-1] if lines else "(no output)"


@dataclass(frozen=True)
class CheckpointRequest:
    image_path: Path
    work_path: Path
    leave_running: bool = True
    file_locks: bool = True
    tcp_established: bool = False
    # A lazy dump (pyshim migrate --lazy): memory stays behind CRIU's page server at this port, and
    # CRIU writes one byte to status_fd once everything else is dumped and the server listens.
    lazy_page_server: str = ""
    status_fd: int = -1


class RuncTimeout(RuncError):
    """runc did not finish before the caller's deadline and was killed."""


def _checkpoint_args(req: CheckpointRequest) -> list[str]:
    args = ["checkpoint", "--image-path", str(req.image_path), "--work-path", str(req.work_path)]
    if req.leave_running:
        args.append("--leave-running")
    if req.file_locks:
        args.append("--file-locks")
    if req.tcp_established:
        args.append("--tcp-established")
    if req.lazy_page_server:
        args += ["--lazy-pages", "--page-server", req.lazy_page_server, "--status-fd", str(req.status_fd)]
    return args



def _read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


class Runc:
    def __init__(self, binary: str, root: Path):
        self.binary = binary
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _base(self) -> list[str]:
        return [self.binary, "--root", str(self.root)]

    @functools.cached_property
    def mount_options(self) -> frozenset[str]:
        """The mount options this runc knows (`runc features`, runc 1.1+); empty when it cannot say."""
        try:
            proc = subprocess.run([self.binary, "features"], stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=10)
            return frozenset(json.loads(proc.stdout).get("mountOptions") or ()) if proc.returncode == 0 \
                else frozenset()
        except (OSError, subprocess.TimeoutExpired, ValueError, AttributeError):
            return frozenset()

    def _run(self, *args: str, timeout: float | None = 60, check: bool = True) -> subprocess.CompletedProcess:
        cmd = self._base() + list(args)
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuncError(f"runc {args[0]} timed out after {timeout}s") from None
        if check and proc.returncode != 0:
            raise RuncError(f"runc {args[0]} failed: {_runc_message(proc.stderr)}")
        return proc

    def state(self, container_id: str) -> RuncState | None:
        proc = self._run("state", container_id, check=False)
        if proc.returncode != 0:
            if b"does not exist" in proc.stderr or b"container does not exist" in proc.stderr:
                return None
            raise RuncError(f"runc state failed: {_runc_message(proc.stderr)}")
        doc = json.loads(proc.stdout)
        return RuncState(doc["id"], int(doc.get("pid") or 0), doc["status"], doc.get("bundle", ""))

    def states(self) -> dict[str, RuncState]:
        """Every container's state in one runc call (start-up recovery reads them all at once)."""
        proc = self._run("list", "--format", "json")
        docs = json.loads(proc.stdout or b"null") or []
        return {d["id"]: RuncState(d["id"], int(d.get("pid") or 0), d["status"], d.get("bundle", ""))
                for d in docs}

    def list_ids(self) -> list[str]:
        proc = self._run("list", "-q")
        return [line for line in proc.stdout.decode().splitlines() if line]

    def start(self, container_id: str) -> None:
        self._run("start", container_id)

    def kill(self, container_id: str, signal: str = "TERM", all_processes: bool = False) -> None:
        args = ["kill"] + (["--all"] if all_processes else []) + [container_id, signal]
        proc = self._run(*args, check=False)
        if proc.returncode != 0 and b"not running" not in proc.stderr and b"does not exist" not in proc.stderr:
            raise RuncError(f"runc kill failed: {_runc_message(proc.stderr)}")

    def delete(self, container_id: str, force: bool = False) -> None:
        args = ["delete"] + (["--force"] if force else []) + [container_id]
        proc = self._run(*args, check=False)
        if proc.returncode != 0 and b"does not exist" not in proc.stderr:
            raise RuncError(f"runc delete failed: {_runc_message(proc.stderr)}")

    def discard_state_dir(self, container_id: str) -> None:
        """Remove what a `runc create` killed half-way left in runc's root (a directory without a
        complete state.json makes `runc list` fail). Only once runc no longer knows the container."""
        directory = self.root / container_id
        if not container_id or "/" in container_id or not directory.is_dir():
            return
        try:
            if self.state(container_id) is not None:
                return
        except RuncError:
            pass  # a state dir runc cannot even read: exactly what must go
        import shutil

        shutil.rmtree(directory, ignore_errors=True)

    def update(self, container_id: str, resources: dict) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(resources, f)
            f.flush()
            self._run("update", "--resources", f.name, container_id)

    def pause(self, container_id: str) -> None:
        self._run("pause", container_id)

    def resume(self, container_id: str) -> None:
        self._run("resume", container_id)

    def exec_sync(self, container_id: str, process: dict, timeout: float | None) -> ExecResult:
        """Run a process in the container and collect its output; at the timeout, kill what it started."""
        with tempfile.TemporaryDirectory(prefix="exec-sync-", dir=self.root.parent) as workdir:
            spec, pid_file = Path(workdir) / "process.json", Path(workdir) / "pid"
            spec.write_text(json.dumps(process))
            cmd = self._base() + ["exec", "--process", str(spec), "--pid-file", str(pid_file), container_id]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Killing runc alone leaves the process it exec'd running in the container (a hung
                # probe would pile up). While runc lives, the exec'd pid is its child and cannot have
                # been reused. Kill that process and its descendants first, and let runc reap it: a
                # process whose parent runc died first is reparented to the container's init, which
                # may never reap it, and `ps` in the container would show it on (as a zombie).
                exec_pid = _read_pid(pid_file)
                if exec_pid:
                    proctree.kill_family([exec_pid])
                    try:
                        out, err = proc.communicate(timeout=EXEC_REAP_SECONDS)
                        return ExecResult(-1, out, err, timed_out=True)
                    except subprocess.TimeoutExpired:
                        pass
                # Then runc and whatever is left in its session.
                proctree.kill_family([proc.pid])
                out, err = proc.communicate()
                return ExecResult(-1, out, err, timed_out=True)
        if proc.returncode == 255 and b"level=error" in err:
            raise RuncError(f"runc exec failed: {_runc_message(err)}")
        return ExecResult(proc.returncode, out, err)

    def _start_killable(self, args: list[str]) -> subprocess.Popen:
        """runc in its own process group, so a deadline ends runc and the CRIU it started."""
        return subprocess.Popen(self._base() + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)

    def _run_killable(self, args: list[str], timeout: float | None) -> subprocess.CompletedProcess:
        return _wait_killable(self._start_killable(args), timeout, f"runc {args[0]}")

    def checkpoint_command(self, container_id: str, req: CheckpointRequest) -> list[str]:
        """The `runc checkpoint` command line, for a caller that runs it itself (a lazy dump outlives the call)."""
        return self._base() + _checkpoint_args(req) + [container_id]

    def checkpoint(self, container_id: str, req: CheckpointRequest, timeout: float | None) -> None:
        """`runc checkpoint`: CRIU dumps the container into req.image_path, its log into req.work_path."""
        proc = self._run_killable(_checkpoint_args(req) + [container_id], timeout)
        if proc.returncode != 0:
            self.raise_checkpoint_failure(proc)

    def start_checkpoint(self, container_id: str, req: CheckpointRequest) -> subprocess.Popen:
        """`runc checkpoint` started, for a caller that talks to CRIU's action script meanwhile;
        finish_checkpoint waits for it (own process group, as _run_killable)."""
        return self._start_killable(_checkpoint_args(req) + [container_id])

    @staticmethod
    def finish_checkpoint(proc: subprocess.Popen, timeout: float | None) -> subprocess.CompletedProcess:
        """Wait for a started `runc checkpoint`; at the timeout it and its CRIU are killed (RuncTimeout)."""
        return _wait_killable(proc, timeout, "runc checkpoint")

    @staticmethod
    def raise_checkpoint_failure(proc: subprocess.CompletedProcess) -> None:
        raise RuncError(f"runc checkpoint failed: {_runc_message(proc.stderr)}")

    def exec_start(self, container_id: str, process: dict, stdin: bool) -> ExecProcess:
        """Start `runc exec` for a streaming session; the caller owns the returned process's fds."""
        import pty

        workdir = Path(tempfile.mkdtemp(prefix="exec-", dir=self.root.parent))
        (workdir / "process.json").write_text(json.dumps(process))
        cmd = [self.binary, "--root", str(self.root), "--log", str(workdir / "log"), "--log-format", "json",
               "exec", "--process", str(workdir / "process.json"), "--pid-file", str(workdir / "pid"), container_id]
        try:
            if process.get("terminal"):
                master, slave = pty.openpty()
                try:
                    popen = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
                except OSError:
                    os.close(master)
                    raise
                finally:
                    os.close(slave)
                return ExecProcess(popen, workdir, None, None, None, master)
            popen = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
            raise RuncError(f"cannot start runc exec: {e}") from None
        # The fds are ours now; the Popen objects must not close them behind our back.
        fds = [os.dup(f.fileno()) if f else None for f in (popen.stdin, popen.stdout, popen.stderr)]
        for f in (popen.stdin, popen.stdout, popen.stderr):
            if f:
                f.close()
        return ExecProcess(popen, workdir, fds[0], fds[1], fds[2], None)


class ExecProcess:
    """A `runc exec` with its stdio in our hands (the streaming Exec): pipes, or a terminal.

    With a terminal, runc runs in the foreground with a pseudo-terminal of ours as its stdio (as
    CRI-O does): runc allocates the container's terminal, copies between the two, and propagates our
    terminal's size on SIGWINCH. `--console-socket` would need `--detach`, and a detached process is
    reparented away from us, so its exit code would be lost.
    """

    def __init__(self, popen: subprocess.Popen, workdir: Path, stdin: int | None, stdout: int | None,
                 stderr: int | None, terminal: int | None):
        self.popen = popen
        self.workdir = workdir
        self.stdin_fd = stdin
        self.stdout_fd = stdout
        self.stderr_fd = stderr
        self.terminal_fd = terminal

    def process_pid(self) -> int | None:
        """Host pid of the exec'd process (runc's --pid-file), once runc has started it."""
        try:
            text = (self.workdir / "pid").read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def kill(self) -> None:
        """SIGKILL the exec'd process (with its descendants and session), then runc. While runc lives the
        pid is its child's, so it cannot have been reused."""
        if self.popen.poll() is not None:
            return
        pid = self.process_pid()
        if pid:
            # Its children and its session too: a disconnected `sh -c 'a & b'` must not leave `a`.
            proctree.kill_family([pid])
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, 9)

    def resize(self, width: int, height: int) -> None:
        if self.terminal_fd is None or width <= 0 or height <= 0:
            return
        import fcntl
        import signal
        import struct
        import termios

        fcntl.ioctl(self.terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGWINCH)  # runc copies the size to the container's terminal
            except ProcessLookupError:
                pass

    def wait(self) -> int:
        """The exec'd process's exit code; RuncError when runc itself failed (e.g. the container stopped)."""
        code = self.popen.wait()
        if code == 255:
            message = self._runc_error()
            if message:
                raise RuncError(f"runc exec failed: {message}")
        return code

    def _runc_error(self) -> str:
        try:
            lines = (self.workdir / "log").read_text().splitlines()
        except FileNotFoundError:
            return ""
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("level") in ("error", "fatal"):
                return entry.get("msg", "")
        return ""

    def close(self) -> None:
        for fd in (self.stdin_fd, self.stdout_fd, self.stderr_fd, self.terminal_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.stdin_fd = self.stdout_fd = self.stderr_fd = self.terminal_fd = None
        import shutil

        shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_killable(proc: subprocess.Popen, timeout: float | None, what: str) -> subprocess.CompletedProcess:
    """Wait for runc started by _start_killable; at the timeout its whole process group (CRIU included)
    is killed and reaped, then RuncTimeout."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise RuncTimeout(f"{what} did not finish within {timeout:.1f}s and was stopped") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
