"""`pyshim migrate --direct CMD`: the archive streamed node to node, no registry in between.

The migrate CLI speaks only CRI to both daemons, and CRI has no call that takes a file. So the
transport is a command the user gives, run on the source node with the archive as its stdin, that
runs `pyshim checkpoint-image receive` on the target node with the target daemon's store -- typically
`ssh node-b pyshim checkpoint-image receive --root /var/lib/pyshim`. The CLI appends `--tag`,
`--digest` and `--size` (shell-quoted). The receiver checks the stream against the digest and size
the source daemon computed while writing the archive, stores it as a checkpoint image and unpacks its
CRIU images in the same pass (criu_glue.checkpoint_pull.receive_checkpoint_image); the target daemon
sees the image at its next call. Each byte crosses the wire once and is written once on each node,
where the registry path writes it three times (archive, registry, target) and reads it three times.

Preflight runs `CMD --check` (before anything is stopped): the receiver starts and can write the store.
Then, still before the container is frozen, `CMD --stdin-header` is started (a Receiver): its interpreter
start-up, the ssh connection and the opening of the store are paid while the container still runs; once
the archive is complete its digest, size and the image's tag go first, as one JSON line, then the archive.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

from criu_glue.archive import ArchiveDigest
from criu_glue.tarstream import detect_compression
from pyshim.migration.workload import MoveError

_STDERR_LINES = 5


def check_receiver(command: str, timeout: float) -> None:
    """Raise MoveError unless `command --check` succeeds (the target node's receiver is usable)."""
    _run(command, ["--check"], None, timeout, "check the direct transfer to the target")


class Receiver:
    """`CMD --stdin-header`, started before the checkpoint and waiting for its header line on stdin."""

    def __init__(self, command: str, timeout: float):
        self._line = f"{command} --stdin-header"
        self._timeout = timeout
        self._stderr = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(["sh", "-c", self._line], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=self._stderr)
        except OSError as e:
            self._stderr.close()
            raise MoveError(f"cannot start the receiver on the target: `{self._line}`: {e}") from None

    def send(self, archive: Path, written: ArchiveDigest | None, tag: str) -> None:
        """The header, then `archive` (sendfile(2) into the pipe: no copy through this process); wait for
        the receiver to store it. MoveError with the receiver's last lines if it fails."""
        written = written or _digest_of(archive)
        header = json.dumps({"tag": tag, **written.to_json()}).encode() + b"\n"
        broken = ""
        try:
            with open(archive, "rb") as source:
                self._proc.stdin.write(header)
                self._proc.stdin.flush()
                offset = 0
                while offset < written.size:
                    sent = os.sendfile(self._proc.stdin.fileno(), source.fileno(), offset, written.size - offset)
                    if sent == 0:
                        break
                    offset += sent
        except OSError as e:  # BrokenPipeError: the receiver gave up; its stderr says why
            broken = f" ({e.strerror or e})"
        self._finish(f"send the checkpoint archive {archive} to the target{broken}")

    def cancel(self) -> None:
        """No archive after all (the checkpoint failed): the receiver sees no header and keeps nothing."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._close()

    def _finish(self, what: str) -> None:
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            rc = self._proc.wait(timeout=self._timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            self._close()
            raise MoveError(f"cannot {what}: `{self._line}` took longer than {self._timeout:.0f} s") from None
        self._stderr.seek(0)
        stderr = self._stderr.read().decode("utf-8", "replace").strip().splitlines()[-_STDERR_LINES:]
        self._close()
        if rc != 0:
            raise MoveError(f"cannot {what}: `{self._line}` exited {rc}: {' / '.join(stderr) or 'no message'}")

    def _close(self) -> None:
        self._stderr.close()


def _digest_of(archive: Path) -> ArchiveDigest:
    """For a source daemon that reports no digest: learn it here (one more read)."""
    with open(archive, "rb") as f:
        if detect_compression(f) != "none":
            raise MoveError(f"the source daemon reported no digest for the compressed archive {archive}; "
                            "move it through a registry (--registry) instead")
        digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    return ArchiveDigest(digest, digest, archive.stat().st_size)


def _run(command: str, args: list[str], stdin, timeout: float, what: str) -> None:
    line = f"{command} {' '.join(shlex.quote(a) for a in args)}"
    try:
        proc = subprocess.run(["sh", "-c", line], stdin=stdin if stdin is not None else subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MoveError(f"cannot {what}: `{line}` took longer than {timeout:.0f} s") from None
    except OSError as e:
        raise MoveError(f"cannot {what}: `{line}`: {e}") from None
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-_STDERR_LINES:]
        raise MoveError(f"cannot {what}: `{line}` exited {proc.returncode}: {' / '.join(stderr) or 'no message'}")
