"""Size bounds for unpacking untrusted checkpoint content.

A checkpoint archive arrives from another node or a registry, so nothing in it is trusted:
without bounds a small gzip bomb fills the disk, or millions of empty entries exhaust inodes.
The defaults fit big real containers (CRIU page images are as large as the container's memory);
callers that know the free space should pass tighter ones.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ArchiveLimitExceeded

GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    max_total_bytes: int = 64 * GiB   # sum of regular-file sizes written
    max_entries: int = 1_000_000      # members of any type, whiteouts included
    max_path_len: int = 4096          # PATH_MAX: member names and link targets

    def __post_init__(self) -> None:
        for name in ("max_total_bytes", "max_entries", "max_path_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"Limits.{name} must not be negative")


class Budget:
    """Counts what one unpack has consumed and refuses the member that would go over."""

    def __init__(self, limits: Limits, archive: str = ""):
        self.limits = limits
        self.archive = archive
        self.entries = 0
        self.total_bytes = 0

    def charge_entry(self, name: str, size: int = 0, linkname: str = "") -> None:
        """Account for one member before anything of it is written."""
        if len(name.encode("utf-8", "surrogateescape")) > self.limits.max_path_len:
            self._refuse(name, f"name longer than {self.limits.max_path_len} bytes")
        if len(linkname.encode("utf-8", "surrogateescape")) > self.limits.max_path_len:
            self._refuse(name, f"link target longer than {self.limits.max_path_len} bytes")
        self.entries += 1
        if self.entries > self.limits.max_entries:
            self._refuse(name, f"more than {self.limits.max_entries} entries")
        if size < 0:
            self._refuse(name, f"negative size {size}")
        self.total_bytes += size
        if self.total_bytes > self.limits.max_total_bytes:
            self._refuse(name, f"content exceeds {self.limits.max_total_bytes} bytes in total")

    def _refuse(self, name: str, reason: str) -> None:
        raise ArchiveLimitExceeded(name, reason, self.archive)
