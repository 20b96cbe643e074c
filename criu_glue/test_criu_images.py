"""criu_images and the restore facts, on images CRIU 4.2.1 really wrote.

testdata/criu-4.2-busybox holds the small images of `runc checkpoint --tcp-established` (runc 1.1.5,
CRIU 4.2.1) of a busybox container: hostname fixture-host, a seccomp filter, five processes (sh,
two sleeps, `nc -l` and an `nc` connected to it over loopback, so two TCP streams). The expected
values below are what CRIU's own `crit decode` prints for them.
"""
from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from criu_glue import criu_images
from criu_glue.criu import (SeccompMode, prepare_restore_images, read_dump_stats, read_restore_facts,
                            set_uts_hostname)
from criu_glue.criu_images import CORE, FILES, INVENTORY, MNTS, STATS, TCP_STREAM, UTSNS, CriuImageError
from criu_glue.errors import ArchiveError

FIXTURES = Path(__file__).parent / "testdata" / "criu-4.2-busybox"
KIND_OF = {"core-1.img": CORE, "core-6.img": CORE, "core-7.img": CORE, "core-9.img": CORE,
           "core-10.img": CORE, "utsns-12.img": UTSNS, "mountpoints-13.img": MNTS, "files.img": FILES,
           "inventory.img": INVENTORY, "tcp-stream-30537.img": TCP_STREAM, "tcp-stream-30a03.img": TCP_STREAM,
           "stats-dump": STATS}
MS_RDONLY = 1


@pytest.fixture
def images(tmp_path) -> Path:
    copy = tmp_path / "images"
    shutil.copytree(FIXTURES, copy)
    return copy


@pytest.mark.parametrize("name", sorted(KIND_OF))
def test_writer_gives_back_the_bytes_criu_wrote(name):
    data = (FIXTURES / name).read_bytes()
    image = criu_images.decode_image(data, KIND_OF[name], name)
    assert image.entries
    assert criu_images.encode_image(image) == data


def test_facts_match_what_crit_decodes():
    facts = read_restore_facts(FIXTURES)
    assert [c.image for c in facts.credentials] == ["core-1.img", "core-10.img", "core-6.img", "core-7.img",
                                                    "core-9.img"]
    first = facts.credentials[0]
    assert first.uids == (0, 0, 0, 0) and first.gids == (0, 0, 0, 0)
    # runc's default bounding set: cap_bnd [536871968, 0] = bits 5, 10, 29.
    assert first.capabilities == {"CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE"}
    assert facts.seccomp_modes == {c.image: SeccompMode.FILTER for c in facts.credentials}
    assert facts.root_mode is not None and facts.root_mode & 0o7777 == 0o755
    assert facts.dumped_hostname == "fixture-host"
    assert [(s.image, s.inq_len, s.outq_len) for s in facts.tcp_streams] == [
        ("tcp-stream-30537.img", 0, 0), ("tcp-stream-30a03.img", 0, 0)]
    by_path = {m.mountpoint: m for m in facts.mountpoints}
    assert len(facts.mountpoints) == 25
    assert by_path["/proc/sys"].fstype == "proc" and by_path["/proc/sys"].flags & MS_RDONLY
    assert by_path["/proc"].fstype == "proc" and not by_path["/proc"].flags & MS_RDONLY
    assert by_path["/dev/pts"].fstype == "devpts" and by_path["/sys"].fstype == "sysfs"
    assert by_path["/proc/sys"].parent_mnt_id == by_path["/proc"].mnt_id


def test_no_seccomp_reads_as_disabled(images):
    path = images / "core-1.img"
    image = criu_images.read_image(path, CORE)
    image.entries[0].thread_core.seccomp_mode = 0
    criu_images.write_image(path, image)
    assert read_restore_facts(images).seccomp_modes["core-1.img"] == SeccompMode.DISABLED


def test_dump_stats_are_read_without_crit():
    stats = read_dump_stats(FIXTURES / "stats-dump")
    assert (stats.freezing_time_us, stats.frozen_time_us, stats.pages_scanned, stats.pages_written) == \
        (100979, 156944, 112, 77)


def test_missing_or_bad_stats_are_none(tmp_path):
    assert read_dump_stats(tmp_path / "stats-dump") is None
    (tmp_path / "stats-dump").write_bytes(b"junk")
    assert read_dump_stats(tmp_path / "stats-dump") is None


def test_hostname_is_rewritten_in_a_new_file_and_a_linked_original_is_untouched(images, tmp_path):
    shared = tmp_path / "store-copy.img"
    os.link(images / "utsns-12.img", shared)
    before = shared.read_bytes()
    facts = prepare_restore_images(images, "new-pod")
    assert facts.dumped_hostname == "fixture-host"
    image = criu_images.read_image(images / "utsns-12.img", UTSNS)
    assert [e.nodename for e in image.entries] == ["new-pod"]
    assert image.entries[0].domainname == "(none)"
    assert shared.read_bytes() == before
    assert os.stat(images / "utsns-12.img").st_ino != os.stat(shared).st_ino
    assert not list(images.glob(".*.new"))


def test_tcp_stream_queues_are_read_and_written_as_extra_bytes():
    data = (FIXTURES / "tcp-stream-30537.img").read_bytes()
    image = criu_images.decode_image(data, TCP_STREAM)
    image.entries[0].inq_len, image.entries[0].outq_len = 3, 2
    image.extras[0] = b"abcde"
    again = criu_images.decode_image(criu_images.encode_image(image), TCP_STREAM)
    assert again.extras == [b"abcde"] and again.entries[0].inq_len == 3
    with pytest.raises(ValueError):
        image.extras[0] = b"ab"
        criu_images.encode_image(image)


def test_queues_longer_than_the_file_are_refused():
    data = (FIXTURES / "tcp-stream-30537.img").read_bytes()
    image = criu_images.decode_image(data, TCP_STREAM)
    image.entries[0].inq_len = 1000
    image.extras[0] = b"x" * 1000
    truncated = criu_images.encode_image(image)[:-10]
    with pytest.raises(CriuImageError, match="followed by 1000 bytes"):
        criu_images.decode_image(truncated, TCP_STREAM, "tcp-stream-1.img")


def test_an_image_of_another_type_is_refused():
    with pytest.raises(CriuImageError, match="of type UTSNS, expected CORE"):
        criu_images.read_image(FIXTURES / "utsns-12.img", CORE)
    with pytest.raises(CriuImageError, match="not a CRIU image"):
        criu_images.decode_image(b"\x00" * 16, CORE, "core-1.img")


@pytest.mark.parametrize("damage", ["truncated size", "size beyond the end", "not protobuf"])
def test_malformed_entries_are_refused_with_the_image_name(damage):
    data = (FIXTURES / "core-1.img").read_bytes()
    if damage == "truncated size":
        data = data[:10]
    elif damage == "size beyond the end":
        data = data[:8] + struct.pack("<I", len(data)) + data[12:]
    else:
        data = data[:12] + b"\xff" * (len(data) - 12)
    with pytest.raises(CriuImageError, match="core-1.img"):
        criu_images.decode_image(data, CORE, "core-1.img")


def test_bad_image_in_a_checkpoint_is_an_archive_error(images):
    (images / "core-6.img").write_bytes((images / "core-6.img").read_bytes()[:40])
    with pytest.raises(ArchiveError, match="core-6.img"):
        prepare_restore_images(images, "new-pod")


def test_symlinks_and_oversized_images_are_not_read(images, tmp_path, monkeypatch):
    (images / "core-99.img").symlink_to(images / "core-1.img")
    with pytest.raises(CriuImageError, match="cannot open"):
        criu_images.read_image(images / "core-99.img", CORE)
    monkeypatch.setattr(criu_images, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(CriuImageError, match="at most 100"):
        criu_images.read_image(images / "core-1.img", CORE)


def test_build_module_generates_package_relative_modules(tmp_path):
    from criu_glue.criu_pb import _build
    written = _build.generate(out_dir=tmp_path)
    core = tmp_path / "criu_glue" / "criu_pb" / "core_pb2.py"
    assert core in written
    text = core.read_text()
    assert "from . import creds_pb2 as creds__pb2" in text
    assert "\nimport creds_pb2" not in text
