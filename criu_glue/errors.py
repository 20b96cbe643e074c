"""Errors of the checkpoint-archive side, each saying what went wrong and where.

No gRPC here: the daemon's server maps the classes to status codes in one table
(pyshim/server/servicer.py STATUS_CODES: UnsafeArchive and ArchiveLimitExceeded INVALID_ARGUMENT,
any other ArchiveError FAILED_PRECONDITION). The fields carry the archive path and the member so
a log line is enough to find the offending entry.
"""
from __future__ import annotations


class ArchiveError(Exception):
    """Base of every failure raised by criu_glue."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ArchiveFormatError(ArchiveError):
    """The archive is corrupt, truncated, or lacks a member a restore needs."""

    def __init__(self, archive: str, detail: str):
        self.archive = str(archive)
        self.detail = detail
        super().__init__(f"checkpoint archive {self.archive}: {detail}")


class UnsafeArchive(ArchiveError):
    """A member that would write outside its destination, or content we refuse to create."""

    def __init__(self, member: str, reason: str, archive: str = ""):
        self.member = member
        self.reason = reason
        self.archive = str(archive)
        where = f" of {self.archive}" if self.archive else ""
        super().__init__(f"refusing member {member!r}{where}: {reason}")


class ArchiveLimitExceeded(UnsafeArchive):
    """The archive is larger (bytes, entries, path length) than the caller allowed."""
