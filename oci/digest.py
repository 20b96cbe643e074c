"""Content digests ("sha256:<hex>") and streams that compute them while data passes through.

Blobs can be gigabytes, so digests are always computed incrementally on the way to disk,
never over a whole blob held in memory.
"""
from __future__ import annotations

import hashlib
import re
from typing import BinaryIO

from .errors import DigestMismatch, ImageError

# Algorithms the OCI image spec registers; hex lengths let us reject truncated digests early.
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-f0-9]+)$")

CHUNK_SIZE = 1 << 20


def split_digest(digest: str) -> tuple[str, str]:
    """Validate a digest string and return (algorithm, hex)."""
    m = _DIGEST_RE.match(digest or "")
    if not m:
        raise ImageError(f"malformed digest {digest!r}")
    algorithm, hexpart = m.group(1), m.group(2)
    expected_len = _HEX_LENGTH.get(algorithm)
    if expected_len is None:
        raise ImageError(f"unsupported digest algorithm in {digest!r}")
    if len(hexpart) != expected_len:
        raise ImageError(f"digest {digest!r} has {len(hexpart)} hex characters, expected {expected_len}")
    return algorithm, hexpart


def is_digest(value: str) -> bool:
    try:
        split_digest(value)
    except ImageError:
        return False
    return True


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    if algorithm not in _HEX_LENGTH:
        raise ImageError(f"unsupported digest algorithm {algorithm!r}")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def new_hasher(digest: str | None):
    """A hashlib object for the algorithm of `digest` (sha256 when nothing is expected)."""
    algorithm = split_digest(digest)[0] if digest else "sha256"
    return algorithm, hashlib.new(algorithm)


def verify_digest(what: str, expected: str, data: bytes) -> None:
    algorithm, _ = split_digest(expected)
    actual = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    if actual != expected:
        raise DigestMismatch(what, expected, actual)


class DigestingReader:
    """Wraps a readable stream; hashes and counts every byte read through it."""

    def __init__(self, stream: BinaryIO, algorithm: str = "sha256"):
        self._stream = stream
        self._algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if data:
            self._hash.update(data)
            self.size += len(data)
        return data

    def drain(self) -> None:
        """Read to EOF so the digest covers the whole stream (tar readers stop at the end marker)."""
        while self.read(CHUNK_SIZE):
            pass

    @property
    def digest(self) -> str:
        return f"{self._algorithm}:{self._hash.hexdigest()}"
