"""When pyshim lifts the network lock of a CRIU it killed (the lift itself: integration/test_checkpoint.py)."""
from __future__ import annotations

import threading

from pyshim.checkpoint_restore.criu_network_lock import CriuNetworkLocks

NS = "/run/netns/pod-a"


def _locks():
    lifted: list[str] = []
    return CriuNetworkLocks(lift_lock=lambda path: lifted.append(path) or True), lifted


def test_a_dump_that_ended_by_itself_lifts_nothing():
    locks, lifted = _locks()
    with locks.dumping(NS, "c1"):
        pass
    assert lifted == []


def test_a_killed_dump_lifts_the_lock_as_it_ends():
    locks, lifted = _locks()
    with locks.dumping(NS, "c1") as dump:
        dump.killed()
        assert lifted == []  # not while runc checkpoint is still being reaped
    assert lifted == [NS]
    with locks.dumping(NS, "c1"):
        pass
    assert lifted == [NS]  # once per killed dump, not on every later one


def test_the_lift_waits_for_the_last_dump_in_the_namespace():
    """Two containers of one pod dumped side by side: the lock the killed one left is lifted only when
    the other ends, even if that one was not killed (it holds the lock for a reason until then)."""
    locks, lifted = _locks()
    other_started, killed_done = threading.Event(), threading.Event()

    def other():
        with locks.dumping(NS, "c2"):
            other_started.set()
            killed_done.wait(5)
            assert lifted == []

    t = threading.Thread(target=other)
    t.start()
    other_started.wait(5)
    with locks.dumping(NS, "c1") as dump:
        dump.killed()
    assert lifted == []
    killed_done.set()
    t.join(5)
    assert lifted == [NS]


def test_host_network_dumps_take_no_lock():
    locks, lifted = _locks()
    with locks.dumping("", "c1") as dump:
        dump.killed()
    assert lifted == []


def test_a_failing_lift_does_not_raise():
    def broken(path):
        raise OSError("nsenter: No such file or directory")
    locks = CriuNetworkLocks(lift_lock=broken)
    with locks.dumping(NS, "c1") as dump:
        dump.killed()  # the caller is reporting the deadline: nothing more is raised
