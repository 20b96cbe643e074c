"""The one place pyshim runs runc. Each method is one runc command; errors carry runc's message."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pyshim.errors import Internal


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
    return args



class Runc:
    def __init__(self, binary: str, root: Path):
        self.binary = binary
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _base(self) -> list[str]:
        return [self.binary, "--root", str(self.root)]

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
        """Run a process in the container and collect its output; kill it at the timeout."""
        with tempfile.NamedTemporaryFile("w", suffix=".json") as spec:
            json.dump(process, spec)
            spec.flush()
            cmd = self._base() + ["exec", "--process", spec.name, container_id]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                # runc exec forwards signals to the exec'd process, so killing the group ends both.
                os.killpg(proc.pid, 9)
                out, err = proc.communicate()
                return ExecResult(-1, out, err, timed_out=True)
        if proc.returncode == 255 and b"level=error" in err:
            raise RuncError(f"runc exec failed: {_runc_message(err)}")
        return ExecResult(proc.returncode, out, err)

    def _run_killable(self, args: list[str], timeout: float | None) -> subprocess.CompletedProcess:
        """Run runc in its own process group, so a deadline ends runc and the CRIU it started."""
        proc = subprocess.Popen(self._base() + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            raise RuncTimeout(f"runc {args[0]} did not finish within {timeout:.1f}s and was stopped") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def checkpoint(self, container_id: str, req: CheckpointRequest, timeout: float | None) -> None:
        """`runc checkpoint`: CRIU dumps the container into req.image_path, its log into req.work_path."""
        proc = self._run_killable(_checkpoint_args(req) + [container_id], timeout)
        if proc.returncode != 0:
            raise RuncError(f"runc checkpoint failed: {_runc_message(proc.stderr)}")
