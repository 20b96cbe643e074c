"""The background sha256 gives hashlib's digest, whatever the chunks, and a changed buffer cannot skew it."""
from __future__ import annotations

import hashlib
import os

import pytest

from criu_glue.background_hash import BackgroundHash, GrowingFileHash


def test_it_is_hashlibs_digest_of_the_chunks_in_order():
    chunks = [os.urandom(n) for n in (0, 1, 4096, 1 << 20, 77)] * 30
    h = BackgroundHash()
    for chunk in chunks:
        h.update(chunk)
    assert h.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest() == h.hexdigest()


def test_a_reused_buffer_is_copied_when_handed_over():
    buffer = bytearray(b"a" * 1000)
    h = BackgroundHash()
    h.update(memoryview(buffer))
    buffer[:] = b"b" * 1000  # what a compressor does with its output buffer
    assert h.hexdigest() == hashlib.sha256(b"a" * 1000).hexdigest()


def test_no_update_after_the_end():
    h = BackgroundHash()
    h.close()
    with pytest.raises(ValueError):
        h.update(b"x")


# ---------------------------------------------------------------- GrowingFileHash

def _growing_file(tmp_path):
    return os.open(tmp_path / "growing", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)


def test_a_growing_file_is_hashed_as_written(tmp_path):
    fd = _growing_file(tmp_path)
    try:
        h = GrowingFileHash(fd, chunk=1000)  # several reads per step, and partial ones
        pieces = [os.urandom(n) for n in (0, 1, 4096, 77, 300_000, 999, 1000, 1001)]
        size = 0
        for piece in pieces:
            os.write(fd, piece)
            size += len(piece)
            h.written(size)
        os.write(fd, b"not yet said to be written")  # beyond what hexdigest() is asked for
        assert h.hexdigest(size) == hashlib.sha256(b"".join(pieces)).hexdigest() == h.hexdigest(size)
    finally:
        h.close()
        os.close(fd)


def test_a_file_shorter_than_said_is_an_error(tmp_path):
    fd = _growing_file(tmp_path)
    try:
        os.write(fd, b"x" * 100)
        h = GrowingFileHash(fd)
        with pytest.raises(OSError, match="ended at byte 100 of 200"):
            h.hexdigest(200)
    finally:
        os.close(fd)


def test_an_unreadable_file_is_an_error(tmp_path):
    fd = os.open(tmp_path / "write-only", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"x" * 100)
        h = GrowingFileHash(fd)
        with pytest.raises(OSError):
            h.hexdigest(100)
    finally:
        os.close(fd)


def test_close_ends_the_thread_without_a_digest(tmp_path):
    fd = _growing_file(tmp_path)
    try:
        h = GrowingFileHash(fd)
        h.written(1 << 30)  # never written: the thread must not wait for it
        h.close()
        assert not h._thread.is_alive()
    finally:
        os.close(fd)


def test_file_ranges_are_hashed_in_their_turn_between_chunks(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"0123456789" * 1000)
    fd = os.open(path, os.O_WRONLY)  # as a receiver's image file: written only; the thread reads it itself
    try:
        h = BackgroundHash()
        h.update(b"head")
        h.update_from_file(fd, 5, 10_000 - 5 - 3)
        h.update(b"tail")
    finally:
        os.close(fd)
    assert h.hexdigest() == hashlib.sha256(b"head" + path.read_bytes()[5:-3] + b"tail").hexdigest()


def test_a_file_range_beyond_the_end_is_an_error(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        h = BackgroundHash()
        h.update_from_file(fd, 50, 100)
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="ended at byte 100 of 150"):
        h.hexdigest()
