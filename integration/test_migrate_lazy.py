"""`pyshim migrate --lazy` (post-copy) between the two test nodes: the target runs at once and pulls the
memory from the source's CRIU page server. Real runc, CRIU, userfaultfd and a real wire (with tc to slow it)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cri_api import api_pb2 as cri
from criu_glue import lazy_pages
from integration.test_migrate import containers, pods, pyshim, run_pod
from integration.test_migrate_direct import receiver
from pyshim.internal import host_caps
from pyshim.internal.cri_log import read_log

# 6 MB of random text in the shell's memory, its checksum at start, then a counter that prints the
# checksum again every 10 ticks: a page that came back wrong (or never came) changes the sum.
MEMORY_COUNTER = (
    'big=$(head -c 4500000 /dev/urandom | base64 | tr -d "\\n"); echo "sum0 $(echo "$big" | md5sum)"; '
    'i=0; while true; do i=$((i+1)); echo "tick $i"; '
    'if [ $((i % 10)) = 0 ]; then echo "sum $(echo "$big" | md5sum)"; fi; sleep 0.1; done')
# The same, with {size} bytes more held by a `sort` (enough pages to kill the page server mid-stream).
HOLDER_AND_COUNTER = "(yes $(head -c 1023 /dev/zero | tr '\\000' a) | head -c {size}; sleep 100000) | sort & " \
                     + MEMORY_COUNTER


@pytest.fixture(scope="module")
def big_pipes():
    """CRIU's lazy page server needs fs.pipe-max-size >= 4 MiB without CAP_SYS_RESOURCE (pyshim checks, never
    sets it): raised for these tests only when needed, the old value put back afterwards."""
    if not host_caps.lazy_page_server_problem():
        yield
        return
    old = host_caps.pipe_max_size()
    Path(host_caps.PIPE_MAX_SIZE_SYSCTL).write_text(str(host_caps.LAZY_PAGE_SERVER_PIPE_BYTES))
    try:
        yield
    finally:
        Path(host_caps.PIPE_MAX_SIZE_SYSCTL).write_text(str(old))


@pytest.fixture
def nodes(two_nodes_clean, big_pipes):
    yield two_nodes_clean
    two_nodes_clean.remove_everything()


@pytest.fixture
def work_dir(tmp_path):
    d = tmp_path / "migrate"
    d.mkdir(mode=0o700)
    return d


def migrate_lazy(nodes, cid: str, work_dir: Path, *extra: str, check: bool = True, wait: bool = True):
    args = ["migrate", cid, "--from", nodes.a.endpoint, "--to", nodes.b.endpoint, "--lazy",
            "--page-server", nodes.a.wire_ip, "--direct", receiver(nodes.b), "--work-dir", str(work_dir), *extra]
    if wait:
        return pyshim(*args, check=check)
    return subprocess.Popen([sys.executable, "-m", "pyshim", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def log_lines(node, cid) -> list[str]:
    with node.client() as c:
        path = Path(c.status(cid).status.log_path)
    return [e.text.rstrip("\n") for e in read_log(path)]


def wait_lines(node, cid, predicate, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = log_lines(node, cid)
        if predicate(lines):
            return lines
        assert time.monotonic() < deadline, f"not in the log of {cid}: {lines[-5:]}"
        time.sleep(0.1)


def sums(lines: list[str]) -> list[str]:
    return [line.split(" ", 1)[1] for line in lines if line.startswith("sum ")]


def ticks(lines: list[str]) -> list[int]:
    return [int(line.split()[1]) for line in lines if line.startswith("tick ")]


def node_leftovers(nodes) -> list[str]:
    """What a lazy move may leave: lazy-pages daemons or their sockets, CRIU page servers, lazy dumps."""
    found = []
    for node in nodes.nodes:
        root = node.settings.root
        found += [f"node {node.name}: lazy-pages daemon {pid}" for pid in lazy_pages.find_daemons(root)]
        found += [f"node {node.name}: {p}" for p in root.rglob(lazy_pages.SOCKET_NAME)]
        work = root / "lazy-checkpoint-work"
        found += [f"node {node.name}: {p}" for p in (work.iterdir() if work.is_dir() else [])]
        found += [f"node {node.name}: runc checkpoint {pid}" for pid in _lazy_runc_checkpoints(node)]
    return found


def _lazy_runc_checkpoints(node) -> list[int]:
    """Live `runc checkpoint --lazy-pages` processes of this node's daemon (their CRIU is their child)."""
    runc_root = str(node.settings.state_dir / "runc").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"checkpoint" in argv and b"--lazy-pages" in argv and runc_root in argv:
                found.append(int(entry.name))
    return found


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def test_lazy_move_keeps_memory_and_counter_and_leaves_nothing(nodes, work_dir):
    _, cid = run_pod(nodes.a, nodes.busybox_ref, ["sh", "-c", MEMORY_COUNTER])
    before = wait_lines(nodes.a, cid, lambda lines: len(sums(lines)) >= 1)
    sum0 = next(line for line in before if line.startswith("sum0 ")).split(" ", 1)[1]

    report = json.loads(migrate_lazy(nodes, cid, work_dir, "--json").stdout)
    moved = report["target_container"]
    assert not containers(nodes.a) and not pods(nodes.a), "the source container and pod were not removed"
    assert [c.id for c in containers(nodes.b)] == [moved]
    assert report["downtime_ms"] > 0 and "pages" in report["phases_ms"]
    with nodes.b.client() as c:
        info = json.loads(c.status(moved, verbose=True).info["info"])
    assert info["lazyPages"] == "complete", info
    assert info["lazyPagesSource"] == f"{nodes.a.wire_ip}:{info['lazyPagesSource'].rsplit(':', 1)[1]}"
    assert info["lazyPagesTotalBytes"] >= 6_000_000 and info["lazyPagesCopiedBytes"] >= 6_000_000, info
    # After every page arrived: the checksum printed on B is the original, and the counter went on.
    lines = wait_lines(nodes.b, moved, lambda lines: len(sums(lines)) >= 2, timeout=30)
    assert all(s == sum0 for s in sums(lines)), (sum0, sums(lines))
    on_b = ticks(lines)  # the log came along with the archive: the whole count, A's part first
    assert on_b == list(range(1, len(on_b) + 1)) and len(on_b) > len(ticks(before)), on_b
    assert not list(work_dir.iterdir())
    assert node_leftovers(nodes) == []


def test_page_server_killed_mid_stream_target_killed_source_runs_on(nodes, work_dir):
    _, cid = run_pod(nodes.a, nodes.busybox_ref, ["sh", "-c", HOLDER_AND_COUNTER.format(size=256 << 20)])
    before = wait_lines(nodes.a, cid, lambda lines: len(sums(lines)) >= 1)
    sum0 = next(line for line in before if line.startswith("sum0 ")).split(" ", 1)[1]
    with nodes.a.client() as c:  # `head` ends once the holder has read everything: then `sort` holds it all
        deadline = time.monotonic() + 60
        while "head" in c.exec_sync(cid, ["ps", "-o", "comm"]).stdout.decode().split():
            assert time.monotonic() < deadline, "the memory holder never filled up"
            time.sleep(0.2)
    # 256 MiB at 80 Mbit/s takes ~25 s: the page server is surely killed mid-stream.
    nodes.a.run(["tc", "qdisc", "add", "dev", "wire0", "root", "tbf", "rate", "80mbit", "burst", "64kb",
                 "latency", "400ms"])
    try:
        move = migrate_lazy(nodes, cid, work_dir, wait=False)
        try:
            moved = _wait_target_transferring(nodes)
            runc = _lazy_runc_checkpoints(nodes.a)
            assert len(runc) == 1, runc
            criu = _children(runc[0])
            assert criu, "runc checkpoint has no CRIU child"
            for pid in criu:
                os.kill(pid, signal.SIGKILL)
            out, err = move.communicate(timeout=300)
        finally:
            if move.poll() is None:
                move.kill()
                move.communicate()
    finally:
        nodes.a.run(["tc", "qdisc", "del", "dev", "wire0", "root"], check=False)
    # The documented outcome: the move fails and rolls back; the target's process was killed (its pages
    # could not come) and removed; the source, whose frozen tasks held everything, was thawed and runs on.
    assert move.returncode == 1 and "rolled back" in err, (out, err)
    assert "LazyPagesFailed" in err or "failed" in err, err
    assert not containers(nodes.b) and not pods(nodes.b)
    with nodes.a.client() as c:
        status = c.status(cid, verbose=True)
    assert status.status.state == cri.CONTAINER_RUNNING
    assert "lazyDump" not in json.loads(status.info["info"])
    # Its memory is whole and its counter goes on. (The two test nodes share one file system, so the
    # target's restore wrote into the same pod log file: only what A printed since is read.)
    seen = len(log_lines(nodes.a, cid))
    lines = wait_lines(nodes.a, cid, lambda lines: len(sums(lines[seen:])) >= 2, timeout=30)[seen:]
    assert all(s == sum0 for s in sums(lines)), (sum0, sums(lines))
    on_a = ticks(lines)
    assert on_a[0] > 1 and on_a == list(range(on_a[0], on_a[0] + len(on_a))), on_a
    assert moved
    assert not list(work_dir.iterdir())
    assert node_leftovers(nodes) == []


def _wait_target_transferring(nodes, timeout: float = 120) -> str:
    """The target container's id once it runs and its pages are arriving."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in containers(nodes.b):
            with nodes.b.client() as client:
                info = json.loads(client.status(c.id, verbose=True).info["info"])
            if info.get("lazyPages") == "transferring" and info.get("lazyPagesCopiedBytes", 0) > (8 << 20):
                return c.id
        time.sleep(0.1)
    raise AssertionError("the target never ran with pages arriving")


def test_preflight_refuses_a_source_with_small_pipes(nodes, work_dir):
    """Without CAP_SYS_RESOURCE and with fs.pipe-max-size < 4 MiB the move is refused before anything stops."""
    if host_caps.effective_capabilities() & (1 << host_caps.CAP_SYS_RESOURCE):
        pytest.skip("this daemon has CAP_SYS_RESOURCE: the pipe size does not matter")
    old = host_caps.pipe_max_size()
    Path(host_caps.PIPE_MAX_SIZE_SYSCTL).write_text("1048576")
    try:
        _, cid = run_pod(nodes.a, nodes.busybox_ref, ["sleep", "1000"])
        proc = migrate_lazy(nodes, cid, work_dir, check=False)
    finally:
        Path(host_caps.PIPE_MAX_SIZE_SYSCTL).write_text(str(old))
    assert proc.returncode == 1 and "sysctl -w fs.pipe-max-size=4194304" in proc.stderr, proc.stderr
    assert [c.state for c in containers(nodes.a)] == [cri.CONTAINER_RUNNING]
    assert not containers(nodes.b) and not pods(nodes.b)
    assert not list(work_dir.glob("*.json"))


def test_pages_that_stop_coming_undo_the_move_after_the_stall_bound(nodes, work_dir):
    """--stall: the wire drops the page stream mid-way; once no page arrived for that long the move is undone
    (target removed, source thawed, its memory whole) instead of waiting for pages that never come."""
    _, cid = run_pod(nodes.a, nodes.busybox_ref, ["sh", "-c", HOLDER_AND_COUNTER.format(size=128 << 20)])
    before = wait_lines(nodes.a, cid, lambda lines: len(sums(lines)) >= 1)
    sum0 = next(line for line in before if line.startswith("sum0 ")).split(" ", 1)[1]
    nodes.a.run(["tc", "qdisc", "add", "dev", "wire0", "root", "tbf", "rate", "80mbit", "burst", "64kb",
                 "latency", "400ms"])
    try:
        move = migrate_lazy(nodes, cid, work_dir, "--stall", "3", wait=False)
        try:
            _wait_target_transferring(nodes)
            # A bucket smaller than one full-size packet: the page stream's packets are all dropped (netem,
            # the obvious tool, is not in every kernel).
            nodes.a.run(["tc", "qdisc", "replace", "dev", "wire0", "root", "tbf", "rate", "1kbit", "burst", "1kb",
                         "latency", "10ms"])
            out, err = move.communicate(timeout=300)
        finally:
            if move.poll() is None:
                move.kill()
                move.communicate()
    finally:
        nodes.a.run(["tc", "qdisc", "del", "dev", "wire0", "root"], check=False)
    assert move.returncode == 1 and "stalled: no page arrived for 3s" in err and "rolled back" in err, (out, err)
    assert not containers(nodes.b) and not pods(nodes.b)
    with nodes.a.client() as c:
        assert c.status(cid).status.state == cri.CONTAINER_RUNNING
    seen = len(log_lines(nodes.a, cid))
    lines = wait_lines(nodes.a, cid, lambda lines: len(sums(lines[seen:])) >= 1, timeout=30)[seen:]
    assert all(s == sum0 for s in sums(lines)), (sum0, sums(lines))
    assert not list(work_dir.glob("*.json"))
    assert node_leftovers(nodes) == []


@pytest.mark.parametrize("then", ["rerun", "rollback"])
def test_killed_after_making_the_target_pod_before_the_freeze(nodes, work_dir, then):
    """The target's pod is made before the source is frozen (out of the downtime) and journaled: a
    `pyshim migrate` killed right after making it leaves the source running; a rerun removes that pod and
    finishes the move, --rollback removes it."""
    _, cid = run_pod(nodes.a, nodes.busybox_ref, ["sh", "-c", MEMORY_COUNTER])
    wait_lines(nodes.a, cid, lambda lines: len(sums(lines)) >= 1)
    args = ["migrate", cid, "--from", nodes.a.endpoint, "--to", nodes.b.endpoint, "--lazy", "--page-server",
            nodes.a.wire_ip, "--direct", receiver(nodes.b), "--work-dir", str(work_dir)]
    killed = subprocess.run([sys.executable, "-m", "pyshim", *args], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYSHIM_CRASH_AT="migrate_lazy:target_pod"))
    assert killed.returncode == -signal.SIGKILL, (killed.stdout, killed.stderr)
    journal = json.loads((work_dir / f"{cid}.lazy.json").read_text())
    assert journal["phase"] == "started" and journal["target_pod"] in [p.id for p in pods(nodes.b)]
    assert [c.state for c in containers(nodes.a)] == [cri.CONTAINER_RUNNING]
    with nodes.a.client() as c:
        assert not json.loads(c.status(cid, verbose=True).info["info"]).get("lastCheckpoint")
    if then == "rollback":
        migrate_lazy(nodes, cid, work_dir, "--rollback")
        assert not pods(nodes.b) and not containers(nodes.b)
        assert [c.state for c in containers(nodes.a)] == [cri.CONTAINER_RUNNING]
    else:
        migrate_lazy(nodes, cid, work_dir)
        assert [p.id for p in pods(nodes.b)] != [journal["target_pod"]] and len(pods(nodes.b)) == 1
        assert not containers(nodes.a) and not pods(nodes.a)
        assert [c.state for c in containers(nodes.b)] == [cri.CONTAINER_RUNNING]
    assert not list(work_dir.glob("*.json"))
    assert node_leftovers(nodes) == []


def test_source_daemon_killed_mid_stream_adopts_its_page_server_and_the_move_finishes(nodes, work_dir):
    """kill -9 of the source's pyshim while CRIU serves pages: runc checkpoint and CRIU run on in their own
    session, the restarted daemon adopts them, and the move completes (a rerun when the first run's
    lazy-finish met the daemon down)."""
    _, cid = run_pod(nodes.a, nodes.busybox_ref, ["sh", "-c", HOLDER_AND_COUNTER.format(size=128 << 20)])
    before = wait_lines(nodes.a, cid, lambda lines: len(sums(lines)) >= 1)
    sum0 = next(line for line in before if line.startswith("sum0 ")).split(" ", 1)[1]
    with nodes.a.client() as c:
        deadline = time.monotonic() + 60
        while "head" in c.exec_sync(cid, ["ps", "-o", "comm"]).stdout.decode().split():
            assert time.monotonic() < deadline, "the memory holder never filled up"
            time.sleep(0.2)
    nodes.a.run(["tc", "qdisc", "add", "dev", "wire0", "root", "tbf", "rate", "80mbit", "burst", "64kb",
                 "latency", "400ms"])
    try:
        move = migrate_lazy(nodes, cid, work_dir, wait=False)
        try:
            moved = _wait_target_transferring(nodes)
            runc = _lazy_runc_checkpoints(nodes.a)
            nodes.a.daemon.kill()
            assert _lazy_runc_checkpoints(nodes.a) == runc, "runc checkpoint died with the daemon"
            nodes.a.daemon.start()
            with nodes.a.client() as c:
                dump = json.loads(c.status(cid, verbose=True).info["info"]).get("lazyDump", {})
            assert dump.get("state") in ("serving", "served"), dump
            out, err = move.communicate(timeout=300)
        finally:
            if move.poll() is None:
                move.kill()
                move.communicate()
    finally:
        nodes.a.run(["tc", "qdisc", "del", "dev", "wire0", "root"], check=False)
    if move.returncode != 0:  # lazy-finish met the daemon down: the journal says finish, a rerun does
        assert "rerun" in err, (out, err)
        migrate_lazy(nodes, cid, work_dir)
    assert not containers(nodes.a) and not pods(nodes.a)
    assert [c.id for c in containers(nodes.b)] == [moved]
    lines = wait_lines(nodes.b, moved, lambda lines: len(sums(lines)) >= 2, timeout=30)
    assert all(s == sum0 for s in sums(lines)), (sum0, sums(lines))
    assert not list(work_dir.glob("*.json"))
    assert node_leftovers(nodes) == []
