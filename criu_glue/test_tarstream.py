import gzip
import io
import os
import tarfile
import time

import pytest
import zstandard

from criu_glue.tarstream import (CorruptTar, add_xattr, decompressed, detect_compression,
                                 member_mtime_ns, member_xattrs, members, open_tar,
                                 set_exact_mtime)


def tar_with(*infos_and_data, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for info, data in infos_and_data:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def file_info(name, data=b""):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def read_all(raw: bytes, seekable=True):
    with open_tar(io.BytesIO(raw), seekable=seekable) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else None) for m in members(tar)]


def raw_pax_archive(payload: bytes) -> bytes:
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(payload)
    out = header.tobuf(format=tarfile.USTAR_FORMAT) + payload
    out += b"\0" * (-len(payload) % 512)
    return out + tarfile.TarInfo("a").tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * 1024


def test_binary_xattrs_exact_mtime_and_non_utf8_names_round_trip():
    info, data = file_info("caf\udce9/bin", b"x")
    set_exact_mtime(info, 1_700_000_000_123_456_789)
    add_xattr(info, "security.capability", b"\x01\x00\x00\x02\xff\xfe")
    add_xattr(info, "user.text", b"plain")
    [(member, content)] = read_all(tar_with((info, data)))
    assert member.name == "caf\udce9/bin" and content == b"x"
    assert member_mtime_ns(member) == 1_700_000_000_123_456_789
    assert dict(member_xattrs(member)) == {"security.capability": b"\x01\x00\x00\x02\xff\xfe",
                                           "user.text": b"plain"}


@pytest.mark.parametrize("seekable", [True, False])
@pytest.mark.parametrize("cut", [100, 512 + 300, 3 * 512 + 200])
def test_truncation_anywhere_is_corrupt_not_a_short_archive(seekable, cut):
    raw = tar_with(file_info("a", b"1" * 1000), file_info("b", b"2"))
    with pytest.raises(tarfile.TarError):
        read_all(raw[:cut], seekable)


@pytest.mark.parametrize("seekable", [True, False])
def test_garbage_where_a_header_should_be_is_corrupt(seekable):
    raw = tar_with(file_info("a", b"1"))
    damaged = raw[:1024] + b"\x55" * 512 + raw[1536:]
    with pytest.raises(CorruptTar, match="invalid header"):
        read_all(damaged, seekable)


def test_a_complete_archive_reads_to_the_end():
    assert [m.name for m, _ in read_all(tar_with(file_info("a"), file_info("b", b"b")))] == \
        ["a", "b"]


@pytest.mark.parametrize("payload", [b"9" * 1_000_000, b"1 " * 500_000,
                                     b"1 hdrcharset=" * 70_000, b"30 path=short\n"])
def test_pathological_pax_headers_fail_fast(payload):
    started = time.monotonic()
    with pytest.raises(CorruptTar, match="pax record"):
        read_all(raw_pax_archive(payload))
    assert time.monotonic() - started < 2  # tarfile's own parser takes hours on the first


def test_oversized_extended_headers_and_gnu_sparse_are_refused():
    with pytest.raises(CorruptTar, match="claims"):
        read_all(raw_pax_archive(b"x" * ((1 << 20) + 1)))
    info, data = file_info("s", b"")
    info.pax_headers = {"GNU.sparse.map": "0,0"}
    with pytest.raises(CorruptTar, match="sparse"):
        read_all(tar_with((info, data)))


def test_members_does_not_accumulate():
    raw = tar_with(*(file_info(f"f{i}") for i in range(50)))
    with open_tar(io.BytesIO(raw), seekable=False) as tar:
        for _ in members(tar):
            assert len(tar.members) == 0


def test_compression_detection_and_multi_frame_zstd():
    raw = tar_with(file_info("a", b"a" * 100), file_info("b", b"b"))
    half = len(raw) // 2
    two_frames = (zstandard.ZstdCompressor().compress(raw[:half]) +
                  zstandard.ZstdCompressor().compress(raw[half:]))
    for blob, kind in ((raw, "none"), (gzip.compress(raw), "gzip"), (two_frames, "zstd")):
        src = io.BytesIO(blob)
        assert detect_compression(src) == kind and src.tell() == 0
        with decompressed(src, kind) as stream:
            assert stream.read() == raw
    with pytest.raises(ValueError):
        with decompressed(io.BytesIO(raw), "bzip2"):
            pass


# ---- ForwardReader: a stream as tarfile's seekable mode reads it -----------------------------------

class _Chunks:
    """A download: read() hands out whatever chunk came next, whatever size was asked."""

    def __init__(self, data: bytes, chunk: int):
        self._chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]

    def read(self, _size: int = -1) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""


def test_forward_reader_reads_skips_and_refuses_to_go_back():
    from criu_glue.tarstream import ForwardReader
    reader = ForwardReader(_Chunks(bytes(range(256)) * 40, 1000))
    assert reader.read(10) == bytes(range(10)) and reader.tell() == 10
    assert reader.seek(2500) == 2500 and reader.read(3) == bytes([2500 % 256, 2501 % 256, 2502 % 256])
    assert bytes(reader.read_view(5000)) == (bytes(range(256)) * 40)[2503:3000]  # at most one chunk, no copy
    with pytest.raises(tarfile.ReadError, match="backwards"):
        reader.seek(100)
    assert reader.seek(1 << 20) == 10240 and reader.read(1) == b""


def test_a_member_cut_short_in_a_stream_is_a_corrupt_tar(tmp_path):
    from criu_glue.tarstream import CorruptTar, ForwardReader, copy_member_data
    reader = ForwardReader(_Chunks(b"x" * 3000, 1024))
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(CorruptTar, match="truncated"):
            copy_member_data(reader, fd, 4000, "member 'pages-1.img'")
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == b"x" * 3000
