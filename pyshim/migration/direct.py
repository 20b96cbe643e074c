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
"""
from __future__ import annotations

import hashlib
import shlex
import subprocess
from pathlib import Path

from criu_glue.archive import ArchiveDigest
from criu_glue.tarstream import detect_compression
from pyshim.migration.workload import MoveError

_STDERR_LINES = 5


def check_receiver(command: str, timeout: float) -> None:
    """Raise MoveError unless `command --check` succeeds (the target node's receiver is usable)."""
    _run(command, ["--check"], None, timeout, "check the direct transfer to the target")


def send_archive(command: str, archive: Path, written: ArchiveDigest | None, tag: str, timeout: float) -> None:
    """Stream `archive` into `command`, which stores it on the target as the checkpoint image `tag`."""
    if written is None:  # a source daemon that reports no digest: learn it here (one more read)
        with open(archive, "rb") as f:
            if detect_compression(f) != "none":
                raise MoveError(f"the source daemon reported no digest for the compressed archive {archive}; "
                                "move it through a registry (--registry) instead")
            digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        written = ArchiveDigest(digest, digest, archive.stat().st_size)
    with open(archive, "rb") as stdin:  # the transport reads the file itself: no copy through this process
        args = ["--tag", tag, "--digest", written.digest, "--size", str(written.size)]
        if written.diff_id != written.digest:  # a compressed archive ([checkpoint] compression on the source)
            args += ["--diff-id", written.diff_id]
        _run(command, args, stdin, timeout, f"send the checkpoint archive {archive} to the target")


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
