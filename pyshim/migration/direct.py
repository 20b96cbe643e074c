"""`pyshim migrate --direct CMD`: the archive streamed node to node, no registry in between.

The migrate CLI speaks only CRI to both daemons, and CRI has no call that takes a file. So the
transport is a command the user gives, run on the source node, that runs `pyshim checkpoint-image
receive` on the target node with the target daemon's store -- typically `ssh node-b pyshim
checkpoint-image receive --root /var/lib/pyshim`. Each byte crosses the wire once and is read once on
the source; the registry path writes it three times (archive, registry, target) and reads it three times.

The preflight starts `CMD --stdin-frames` (a Receiver) and waits for its `ready` (the target's store is
open and writable) before anything is stopped: its interpreter start-up, the ssh connection and the
opening of the store are not part of the downtime.
The archive is sent *while the source daemon writes it*: the Receiver follows the daemon's temporary
archive file (checkpoint.archive_temp_glob) as it grows and sends what is there, framed
(criu_glue.archive_frames); once CheckpointContainer returns, the rest and a trailer with the digest and
size the daemon computed follow. The target checks them against what it received, stores the image,
unpacks its CRIU images in the same pass, and prints `stored ...`: the restore may start. It syncs the
blob to disk after that, while the container is restored; the CLI waits for it at the end of the move.
A failed checkpoint closes the stream before its trailer, and the receiver keeps nothing.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import select
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from criu_glue.archive import ArchiveDigest
from criu_glue.archive_frames import FrameWriter
from criu_glue.errors import ArchiveError
from criu_glue.tarstream import detect_compression
from pyshim.checkpoint_restore.checkpoint import archive_temp_glob
from pyshim.migration.workload import MoveError

_STDERR_LINES = 5
_POLL_SECONDS = 0.003  # how often the follower looks for more of the archive
_CANCEL_SECONDS = 5.0  # a cancelled receiver's time to clean up and exit before it is killed
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_BYTES = 1 << 20


class Receiver:
    """`CMD --stdin-frames`, started before the checkpoint; see the module docstring."""

    def __init__(self, command: str, timeout: float, tag: str):
        self._line = f"{command} --stdin-frames"
        self._timeout = timeout
        self._stderr = tempfile.TemporaryFile()
        try:
            # Its own process group: a cancel kills the whole transport (sh, ssh, ...), not just sh.
            self._proc = subprocess.Popen(["sh", "-c", self._line], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=self._stderr, start_new_session=True)
        except OSError as e:
            self._stderr.close()
            raise MoveError(f"cannot start the receiver on the target: `{self._line}`: {e}") from None
        _widen_pipe(self._proc.stdin.fileno())
        self._writer = FrameWriter(self._proc.stdin.fileno())
        self._ended = threading.Event()  # CheckpointContainer returned (or the move gave up)
        self._cancelled = False
        self._written: ArchiveDigest | None = None
        self._follower: threading.Thread | None = None
        self._error = ""
        self._stored = False
        self.phases_ms: dict = {}  # the receiver's, from its `stored` line
        self.tail_bytes = 0  # sent after CheckpointContainer returned
        self._first_sent_at = 0.0  # time.monotonic() of the archive's first frame
        self.stream_seconds = 0.0  # from the archive's first frame to the target's `stored`
        try:
            self._writer.header(tag)
        except OSError as e:
            self.cancel()
            raise MoveError(f"cannot start the receiver on the target: `{self._line}`: {e.strerror or e}") from None

    def wait_ready(self) -> None:
        """Until the receiver says `ready` (its store is open and writable); MoveError if it fails."""
        line = self._answer()
        if line.strip() != b"ready":
            self._finish("start the receiver on the target")  # its message, if it exited
            raise MoveError(f"cannot start the receiver on the target: `{self._line}` did not say it is "
                            f"ready (answered {line[:200]!r})")

    def follow(self, archive: Path) -> None:
        """Stream the archive the source daemon is about to write at `archive`, from its temporary file
        while it grows (call it just before CheckpointContainer)."""
        stale = set(archive.parent.glob(archive_temp_glob(archive)))  # a killed daemon's leftovers
        self._follower = threading.Thread(target=self._follow, args=(archive, stale), name="direct-follow",
                                          daemon=True)
        self._follower.start()

    def finish(self, archive: Path, written: ArchiveDigest | None) -> None:
        """The archive is complete at `archive` (CheckpointContainer returned): send what is left and the
        trailer, and wait until the target has stored the image. MoveError with the receiver's last
        lines if anything fails."""
        self._written = written
        self._ended.set()
        if self._follower is not None:
            self._follower.join(self._timeout)
            if self._follower.is_alive():  # the transport takes no more bytes and does not exit either
                self._kill()
                self._follower.join()
                self._error = self._error or f"the receiver did not take the rest within {self._timeout:.0f} s"
        else:  # after a resume: the whole archive, nothing was followed
            try:
                self._stream_tail(archive, None, 0)
            except (OSError, ArchiveError, MoveError) as e:
                self._error = getattr(e, "strerror", None) or str(e)
        if self._error:
            self._give_up(f"send the checkpoint archive {archive} to the target ({self._error})")
        self._await_stored(f"send the checkpoint archive {archive} to the target")

    def wait_durable(self) -> None:
        """After the restore: let the target complete and sync the stored image, and wait for that."""
        self._finish("sync the received checkpoint image on the target")

    def cancel(self) -> None:
        """No archive after all (the checkpoint failed): the stream ends before its trailer, so the
        receiver keeps nothing; it is killed if it does not exit by itself."""
        self._cancelled = True
        self._ended.set()
        if self._follower is not None:
            self._follower.join(_CANCEL_SECONDS)
            if self._follower.is_alive():  # blocked on a receiver that reads no more
                self._kill()
                self._follower.join()
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=_CANCEL_SECONDS)
        except subprocess.TimeoutExpired:
            self._kill()
        self._close()

    def _kill(self) -> None:
        if self._proc.poll() is None:  # not reaped yet: its pid, the group's id, is still ours
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._proc.wait()

    # ---- the follower thread -------------------------------------------------------------------

    def _follow(self, archive: Path, stale: set[Path]) -> None:
        fd = None
        try:
            fd = self._open_growing(archive, stale)
            offset = 0
            while fd is not None and not self._cancelled:
                size = os.fstat(fd).st_size
                if size > offset:
                    self._first_sent_at = self._first_sent_at or time.monotonic()
                    offset += self._writer.frames_from_file(fd, offset, size - offset)
                elif self._ended.is_set():
                    break
                else:
                    self._ended.wait(_POLL_SECONDS)
            if not self._cancelled:
                self._stream_tail(archive, fd, offset if fd is not None else 0)
        except (OSError, ArchiveError, MoveError) as e:
            self._error = getattr(e, "strerror", None) or str(e)
        finally:
            if fd is not None:
                os.close(fd)

    def _open_growing(self, archive: Path, stale: set[Path]) -> int | None:
        """The daemon's temporary archive file, opened as soon as it appears; None if the call ended
        first (the archive, if any, is complete then)."""
        pattern = archive_temp_glob(archive)
        while not self._ended.is_set():
            for candidate in archive.parent.glob(pattern):
                if candidate not in stale:
                    try:
                        return os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        continue  # renamed or removed meanwhile
            self._ended.wait(_POLL_SECONDS)
        return None

    def _stream_tail(self, archive: Path, fd: int | None, offset: int) -> None:
        """What is left of the complete `archive`, then the trailer. `fd`: the file followed so far,
        which must be the archive's inode (its bytes were sent already)."""
        own = fd is None
        if own:
            fd = os.open(archive, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_ino != os.stat(archive).st_ino:
                raise ArchiveError(f"the file streamed is not the archive {archive} the checkpoint wrote")
            written = self._written or _digest_of(archive)
            self.tail_bytes = max(0, written.size - offset)
            if offset > written.size:
                raise ArchiveError(f"{offset} bytes were streamed of the {written.size}-byte archive {archive}")
            self._first_sent_at = self._first_sent_at or time.monotonic()
            self._writer.frames_from_file(fd, offset, written.size - offset)
            self._writer.trailer(written)
            # stdin stays open: its end tells the receiver to complete and sync the image (wait_durable),
            # which is kept off the target's CPUs while the container is restored.
        finally:
            if own:
                os.close(fd)

    # ---- the receiver's answers ----------------------------------------------------------------

    def _answer(self) -> bytes:
        """The receiver's next line on stdout; b"" if it ended or said nothing within the timeout."""
        ready, _, _ = select.select([self._proc.stdout], [], [], self._timeout)
        return self._proc.stdout.readline() if ready else b""

    def _await_stored(self, what: str) -> None:
        line = self._answer()
        if line.strip() == b"ready":  # a receiver started after a resume: nobody waited for it
            line = self._answer()
        if not line.startswith(b"stored "):
            self._finish(what)  # the receiver failed (its message) or answered nothing in time
            raise MoveError(f"cannot {what}: `{self._line}` did not report the image stored "
                            f"(answered {line[:200]!r})")
        self._stored = True
        self.stream_seconds = time.monotonic() - self._first_sent_at if self._first_sent_at else 0.0
        try:  # `stored ID TAG {phases}`; figures only, an older receiver may send none
            phases = json.loads(line.split(b" ", 3)[3])
            self.phases_ms = phases if isinstance(phases, dict) else {}
        except (IndexError, ValueError):
            pass

    def _give_up(self, what: str) -> None:
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        self._finish(what)
        raise MoveError(f"cannot {what}: `{self._line}` exited 0 without storing it")

    def _finish(self, what: str) -> None:
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            rc = self._proc.wait(timeout=self._timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            self._close()
            raise MoveError(f"cannot {what}: `{self._line}` took longer than {self._timeout:.0f} s") from None
        self._stderr.seek(0)
        stderr = self._stderr.read().decode("utf-8", "replace").strip().splitlines()[-_STDERR_LINES:]
        self._close()
        if rc != 0:
            raise MoveError(f"cannot {what}: `{self._line}` exited {rc}: {' / '.join(stderr) or 'no message'}")

    def _close(self) -> None:
        for stream in (self._proc.stdout, self._stderr):
            if not stream.closed:
                stream.close()


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe instead of 64 KiB: the sender blocks less often on a receiver that writes to disk."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)
    except OSError:
        pass  # the limit (/proc/sys/fs/pipe-max-size) may be lower; the default works too


def _digest_of(archive: Path) -> ArchiveDigest:
    """For a source daemon that reports no digest: learn it here (one more read)."""
    with open(archive, "rb") as f:
        if detect_compression(f) != "none":
            raise MoveError(f"the source daemon reported no digest for the compressed archive {archive}; "
                            "move it through a registry (--registry) instead")
        digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    return ArchiveDigest(digest, digest, archive.stat().st_size)
