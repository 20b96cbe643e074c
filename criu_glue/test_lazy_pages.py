"""The lazy-pages adapter's pure parts: page-server addresses, the command, progress from CRIU's log."""
from __future__ import annotations

from pathlib import Path

import pytest

from criu_glue.lazy_pages import PAGE_SIZE, PageServer, ProgressReader, lazy_pages_command

# Lines as CRIU 4.2.1's lazy-pages daemon writes them at -v4 (trimmed from a real run).
LOG = """\
(00.043585) uffd: Waiting for incoming connections on lazy-pages.socket
(00.597244) uffd: Received PID: 14, uffd: 12
(00.597317) uffd: 14-12: Found 11 VMAs in image
(00.597325) uffd: 14-12: Found 8 pages to be handled by UFFD
(00.597340) uffd: Received PID: 1, uffd: 13
(00.597383) uffd: 1-13: Found 10 pages to be handled by UFFD
(00.597422) uffd: 14-12: #PF at 0x2d9ce000
(00.598947) uffd: 1-13: uffd_copy: 0x14796000/16384
(00.601919) uffd: 14-12: zero page at 0x2d9ce000
(00.601920) uffd: 14-12: uffd_copy: 0x2d9cf000/28672
(00.601921) uffd: 14-12: UFFD transferred pages: (8/8)
"""


def test_progress_sums_bytes_and_knows_who_is_done(tmp_path: Path):
    log = tmp_path / "lazy-pages.log"
    log.write_text(LOG)
    reader = ProgressReader(log)
    p = reader.read()
    assert p.total_bytes == 18 * PAGE_SIZE
    assert p.copied_bytes == 16384 + PAGE_SIZE + 28672
    assert p.processes == {14, 1} and p.finished == {14}
    assert not p.all_transferred
    with log.open("a") as f:  # appended later, half a line at first
        f.write("(00.602010) uffd: 1-13: uffd_copy: 0x14797000/24576\n(00.602034) uffd: 1-13: UFFD transferred")
    p = reader.read()
    assert p.copied_bytes == 16384 + PAGE_SIZE + 28672 + 24576 and not p.all_transferred
    with log.open("a") as f:
        f.write(" pages: (10/10)\n")
    assert reader.read().all_transferred


def test_an_error_in_the_log_is_never_complete(tmp_path: Path):
    log = tmp_path / "lazy-pages.log"
    log.write_text(LOG + "(00.7) uffd: 1-13: UFFD transferred pages: (3/10)\n"
                   "(00.8) Error (criu/page-xfer.c:1623): page-xfer: Error reading data from page server\n")
    p = ProgressReader(log).read()
    assert p.errors and not p.all_transferred


def test_missing_log_reads_as_nothing_yet(tmp_path: Path):
    p = ProgressReader(tmp_path / "none.log").read()
    assert p.total_bytes == 0 and not p.all_transferred


@pytest.mark.parametrize("text,expected", [("10.0.0.1:27000", PageServer("10.0.0.1", 27000)),
                                           ("[fd00::1]:5", PageServer("fd00::1", 5))])
def test_page_server_parses(text, expected):
    assert PageServer.parse(text) == expected
    assert PageServer.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["somehost:1", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", ":5", "10.0.0.1:x"])
def test_page_server_refuses(text):
    with pytest.raises(ValueError):
        PageServer.parse(text)


def test_command_names_work_dir_and_page_server():
    cmd = lazy_pages_command("criu", Path("/i"), Path("/w"), 7, PageServer("10.0.0.1", 27000))
    assert cmd[:2] == ["criu", "lazy-pages"]
    assert cmd[cmd.index("-W") + 1] == "/w" and cmd[cmd.index("-D") + 1] == "/i"
    assert cmd[cmd.index("--status-fd") + 1] == "7"
    assert cmd[-5:] == ["--page-server", "--address", "10.0.0.1", "--port", "27000"]
    assert "--page-server" not in lazy_pages_command("criu", Path("/i"), Path("/w"), 7)
