"""CRIU's kernel-feature cache (/run/criu.kdat) on a host whose /run is not a tmpfs.

Every CRIU run first learns what the kernel can do (criu/kerndat.c): about 35 ms of probes on this
VM, unless it can load /run/criu.kdat. CRIU 4.2 loads that file from any filesystem but writes it
only to a tmpfs, where it vanishes at reboot, so that a new kernel is never described by an old
file (the file carries two magic numbers and nothing else that ties it to the kernel that wrote it).
On a host whose /run is a plain directory of the root filesystem, CRIU thus probes at every dump
and restore; in a pod checkpoint that happens while the pod is frozen.

`prime` gives such a host the cache: `criu check` runs in a private mount namespace with a tmpfs over
/run, where CRIU writes the file, which is then copied to the real /run and renamed into place. The
daemon does it at every start, removing the previous file first, so the file is at most as old as
the daemon's start: a kernel change means a reboot, and the daemon's start after it replaces the
file. Between a reboot and that start, a CRIU run by hand could load the previous kernel's file;
hosts that run CRIU outside pyshim should delete it at boot (systemd-tmpfiles: `r /run/criu.kdat`).
"""
from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TMPFS_MAGIC = 0x01021994
KDAT_NAME = "criu.kdat"
# The file is a C struct of a few KiB; anything far off is not one.
MAX_KDAT_BYTES = 1 << 20
MODES = ("auto", "always", "never")


class KdatError(Exception):
    pass


@dataclass(frozen=True)
class Primed:
    path: Path
    size: int
    seconds: float


def is_tmpfs(path: Path) -> bool:
    """Whether `path` is on a tmpfs (where CRIU keeps its cache itself)."""
    try:
        return _statfs_type(path) == TMPFS_MAGIC
    except (OSError, subprocess.SubprocessError, ValueError):
        return False


def _statfs_type(path: Path) -> int:
    # os.statvfs has no f_type; `stat -f` is util-linux/coreutils' way to read it.
    out = subprocess.run(["stat", "-f", "-c", "%t", str(path)], capture_output=True, text=True, timeout=10,
                         check=True).stdout.strip()
    return int(out, 16)


def wanted(mode: str, run_dir: Path = Path("/run")) -> bool:
    """`auto`: only where /run is not a tmpfs (elsewhere CRIU keeps the cache itself)."""
    if mode not in MODES:
        raise KdatError(f"checkpoint.criu_kdat_cache must be one of {MODES}, not {mode!r}")
    return mode == "always" or (mode == "auto" and not is_tmpfs(run_dir))


def prime(criu: str = "criu", run_dir: Path = Path("/run"), timeout: float = 60) -> Primed:
    """Write a fresh kernel-feature cache to `run_dir`/criu.kdat (atomically); KdatError if CRIU wrote none.
    The previous file is removed first: while a new one is made, CRIU probes rather than trust it."""
    started = time.monotonic()
    target = run_dir / KDAT_NAME
    target.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="criu-kdat-") as scratch:
        produced = Path(scratch) / KDAT_NAME
        # A tmpfs over /run in a mount namespace of its own (private: nothing propagates to the
        # host's), where CRIU saves its probe; the copy leaves before the namespace ends with sh.
        script = 'mount -t tmpfs -o size=1m,mode=0755 criu-kdat /run && "$1" check >/dev/null 2>&1; ' \
                 'cp /run/criu.kdat "$2"'
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", criu,
                               str(produced)], stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        if proc.returncode != 0 or not produced.is_file():
            raise KdatError(f"CRIU wrote no kernel-feature cache in a private /run: "
                            f"{proc.stderr.decode(errors='replace').strip() or f'exit {proc.returncode}'}")
        size = produced.stat().st_size
        if not 0 < size <= MAX_KDAT_BYTES:
            raise KdatError(f"CRIU's kernel-feature cache has an unlikely size ({size} bytes)")
        # Same filesystem as the target: the rename is atomic, a CRIU starting meanwhile reads the
        # whole old state (no file) or the whole new file. Not CRIU's own criu.kdat.tmp name.
        tmp = run_dir / f".{KDAT_NAME}.pyshim-{secrets.token_hex(4)}"
        try:
            with open(produced, "rb") as src, open(tmp, "xb") as dst:
                dst.write(src.read())
                os.fchmod(dst.fileno(), 0o600)
            tmp.rename(target)
        finally:
            tmp.unlink(missing_ok=True)
    return Primed(target, size, time.monotonic() - started)
