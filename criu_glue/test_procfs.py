"""The shared /proc command-line reader, and the checks built on it."""
import subprocess
import sys
import time
from pathlib import Path

from criu_glue import lazy_pages
from criu_glue.procfs import live_pids, process_argv
from pyshim.internal import procs


def _fake_proc(tmp_path: Path, pid: int, cmdline: bytes) -> Path:
    (tmp_path / str(pid)).mkdir(parents=True)
    (tmp_path / str(pid) / "cmdline").write_bytes(cmdline)
    return tmp_path


def test_argv_is_split_exactly_on_the_terminating_nuls(tmp_path):
    proc = _fake_proc(tmp_path, 7, b"criu\0lazy-pages\0\0-W\0/w\0")
    assert process_argv(7, proc) == [b"criu", b"lazy-pages", b"", b"-W", b"/w"]
    _fake_proc(tmp_path, 8, b"renamed without a final nul")
    assert process_argv(8, proc) == [b"renamed without a final nul"]


def test_no_argv_for_a_missing_process_a_zombie_or_a_bad_pid(tmp_path):
    proc = _fake_proc(tmp_path, 9, b"")
    assert process_argv(9, proc) is None and process_argv(10, proc) is None
    assert process_argv(0, proc) is None and process_argv(-1, proc) is None
    assert sorted(live_pids(proc)) == [9]


def test_the_checks_built_on_it_recognise_real_processes(tmp_path):
    work = tmp_path / "work"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "lazy-pages", str(work),
                              "conmon-of-abc"])
    try:
        deadline = time.monotonic() + 30
        while b"conmon-of-abc" not in (process_argv(child.pid) or []) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the child has exec'd (before that its command line is empty or ours)
        assert process_argv(child.pid)[-3:] == [b"lazy-pages", str(work).encode(), b"conmon-of-abc"]
        assert child.pid in live_pids()
        assert lazy_pages.is_lazy_pages_daemon(child.pid, work)
        assert not lazy_pages.is_lazy_pages_daemon(child.pid, tmp_path / "other")
        assert not procs.is_conmon_of(child.pid, "abc"), "argv[0] is python, not conmon"
    finally:
        child.kill()
        child.wait()
    assert not lazy_pages.is_lazy_pages_daemon(child.pid, work)
