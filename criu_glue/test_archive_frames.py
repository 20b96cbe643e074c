"""The framing of an archive streamed while it is written: the archive back, or a refusal when the stream
is cut, malformed, too large, or its trailer does not match its bytes."""
from __future__ import annotations

import io
import json
import struct
import tempfile
from pathlib import Path

import pytest

from criu_glue.archive import ArchiveDigest, write_archive
from criu_glue.archive_frames import MAX_FRAME, FrameReader, FrameWriter, FramingError, read_header
from criu_glue.test_archive import prepare_members

TAG = "localhost/moved/app:1"


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="archive-frames-test-") as d:
        yield Path(d)


def framed(tmp_path: Path, archive: Path, written: ArchiveDigest | None, pieces: int = 3,
           tag: str = TAG) -> bytes:
    """What the source sends: the header, `archive` in `pieces` sends (as it grows), the trailer
    (none if `written` is None: the sender gave up)."""
    out = tmp_path / "wire"
    size = archive.stat().st_size
    with open(out, "wb") as sink, open(archive, "rb") as source:
        writer = FrameWriter(sink.fileno())
        writer.header(tag)
        cuts = [size * i // pieces for i in range(pieces + 1)]
        for start, end in zip(cuts, cuts[1:]):
            writer.frames_from_file(source.fileno(), start, end - start)
        if written is not None:
            writer.trailer(written)
        assert writer.sent == size
    return out.read_bytes()


def archive_of(tmp_path: Path) -> tuple[Path, ArchiveDigest]:
    out = tmp_path / "ck.tar"
    return out, write_archive(out, prepare_members(tmp_path))


# ---- the framing alone ---------------------------------------------------------------------------

def test_frames_give_back_the_archive_and_check_the_trailer(tmp_path):
    archive, written = archive_of(tmp_path)
    wire = io.BytesIO(framed(tmp_path, archive, written, pieces=5))
    assert read_header(wire) == TAG
    reader = FrameReader(wire, 1 << 30)
    data = b"".join(iter(lambda: reader.read(1000), b""))
    assert data == archive.read_bytes() and reader.trailer == written


@pytest.mark.parametrize("cut", ["inside a frame", "before the trailer", "inside the trailer"])
def test_a_cut_stream_is_refused(tmp_path, cut):
    archive, written = archive_of(tmp_path)
    wire = framed(tmp_path, archive, written)
    trailer_len = len(json.dumps(written.to_json())) + 1
    at = {"inside a frame": len(wire) // 2, "before the trailer": len(wire) - trailer_len - 4,
          "inside the trailer": len(wire) - 3}[cut]
    stream = io.BytesIO(wire[:at])
    read_header(stream)
    reader = FrameReader(stream, 1 << 30)
    with pytest.raises(FramingError, match="cut"):
        while reader.read(65536):
            pass
    assert reader.trailer is None


def test_a_trailer_that_does_not_match_the_bytes_is_refused(tmp_path):
    archive, written = archive_of(tmp_path)
    for wrong in (ArchiveDigest("sha256:" + "0" * 64, "sha256:" + "0" * 64, written.size),
                  ArchiveDigest(written.digest, written.diff_id, written.size + 1)):
        stream = io.BytesIO(framed(tmp_path, archive, wrong))
        read_header(stream)
        reader = FrameReader(stream, 1 << 30)
        with pytest.raises(FramingError, match="is not the one the source wrote"):
            while reader.read(65536):
                pass


def test_the_size_budget_and_frame_bound_hold(tmp_path):
    archive, written = archive_of(tmp_path)
    stream = io.BytesIO(framed(tmp_path, archive, written))
    read_header(stream)
    reader = FrameReader(stream, written.size - 1)
    with pytest.raises(FramingError, match="size budget"):
        while reader.read(65536):
            pass
    huge = io.BytesIO(struct.pack(">I", MAX_FRAME + 1) + b"x" * 10)
    with pytest.raises(FramingError, match="frame of"):
        FrameReader(huge, 1 << 40).read()


@pytest.mark.parametrize("header", [b"", b"not json\n", b'{"tag": "a:b"}\n',
                                    b'{"format": "pyshim-archive-frames/1"}\n'])
def test_a_missing_or_bad_header_is_refused(header):
    with pytest.raises(FramingError):
        read_header(io.BytesIO(header))
