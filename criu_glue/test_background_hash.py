"""The background sha256 gives hashlib's digest, whatever the chunks, and a changed buffer cannot skew it."""
from __future__ import annotations

import hashlib
import os

import pytest

from criu_glue.background_hash import BackgroundHash


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
