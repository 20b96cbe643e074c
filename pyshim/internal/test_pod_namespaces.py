import os
import subprocess
import time
from pathlib import Path

import pytest

from pyshim.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from pyshim.internal import pod_namespaces as pn
from pyshim.internal.netns import is_ns_pin

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")


def ns_inode(link: str | Path) -> str:
    return os.readlink(link)


@pytest.fixture
def pin_dir(tmp_path):
    d = tmp_path / "pins"
    yield d
    pn.stop_pid_infra(d)
    pn.unpin_namespaces(d)
    assert not (d / "ipc").exists() and not (d / "uts").exists()


def test_pins_new_ipc_and_uts_namespaces_with_hostname(pin_dir):
    pins = pn.pin_namespaces(pin_dir, "pod-host")

    assert set(pins) == {"ipc", "uts"}
    for kind, pin in pins.items():
        assert is_ns_pin(pin)
        pinned = f"{kind}:[{os.stat(pin).st_ino}]"
        assert pinned != ns_inode(f"/proc/self/ns/{kind}"), f"{kind} is the host's namespace"
    inside = subprocess.run(
        ["nsenter", f"--uts={pins['uts']}", f"--ipc={pins['ipc']}", "--", "sh", "-c",
         "hostname; readlink /proc/self/ns/uts /proc/self/ns/ipc"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    hostname, uts_link, ipc_link = inside.stdout.split()
    assert hostname == "pod-host"
    assert uts_link == f"uts:[{os.stat(pins['uts']).st_ino}]"
    assert ipc_link == f"ipc:[{os.stat(pins['ipc']).st_ino}]"
    assert os.uname().nodename != "pod-host"


def test_pin_only_ipc(pin_dir):
    pins = pn.pin_namespaces(pin_dir, "ignored", kinds=("ipc",))
    assert list(pins) == ["ipc"]
    assert is_ns_pin(pins["ipc"])
    assert not (pin_dir / "uts").exists()


def test_pinning_twice_is_refused(pin_dir):
    pn.pin_namespaces(pin_dir, "pod-host")
    with pytest.raises(AlreadyExists):
        pn.pin_namespaces(pin_dir, "pod-host")


@pytest.mark.parametrize("kinds", [("net",), ("ipc", "ipc"), ("pid",)])
def test_unknown_kinds_are_refused(pin_dir, kinds):
    with pytest.raises(InvalidArgument):
        pn.pin_namespaces(pin_dir, "h", kinds=kinds)


def test_bad_hostname_is_refused_before_anything_is_pinned(pin_dir):
    with pytest.raises(InvalidArgument):
        pn.pin_namespaces(pin_dir, "bad host")
    assert not (pin_dir / "ipc").exists()


def test_unpin_is_idempotent(pin_dir):
    pins = pn.pin_namespaces(pin_dir, "pod-host")
    pn.unpin_namespaces(pin_dir)
    pn.unpin_namespaces(pin_dir)
    for pin in pins.values():
        assert not pin.exists()
        assert not is_ns_pin(pin)


def test_pid_infra_is_pid_1_of_its_own_namespace_in_its_own_session(pin_dir):
    infra = pn.start_pid_infra(pin_dir)

    assert pn.pid_infra_alive(pin_dir)
    assert ns_inode(infra.ns_path) != ns_inode("/proc/self/ns/pid")
    status = Path(f"/proc/{infra.pid}/status").read_text()
    assert [l for l in status.splitlines() if l.startswith("NSpid:")][0].split()[1:] == [str(infra.pid), "1"]
    assert os.getsid(infra.pid) != os.getsid(0), "must survive the daemon's session"
    assert pn.load_pid_infra(pin_dir) == infra
    # Named like a pause container, not "sleep": `pkill sleep` in a container must not kill it.
    assert Path(f"/proc/{infra.pid}/comm").read_text().strip() == "pause"
    assert pn.pid_infra_ns_path(pin_dir) == Path(f"/proc/{infra.pid}/ns/pid")


def test_pid_infra_reaps_orphans_in_its_namespace(pin_dir):
    infra = pn.start_pid_infra(pin_dir)
    # A child that exits at once, whose parent exits first: it is re-parented to the infra.
    subprocess.run(
        ["nsenter", f"--pid={infra.ns_path}", "--", "sh", "-c", "(sleep 0.1 &); exit 0"],
        check=True,
    )  # fmt: skip
    time.sleep(0.5)
    children = Path(f"/proc/{infra.pid}/task/{infra.pid}/children").read_text().split()
    zombies = [c for c in children if Path(f"/proc/{c}/stat").read_text().split(")")[-1].split()[0] == "Z"]
    assert zombies == []


def test_stop_pid_infra_kills_namespace_and_is_idempotent(pin_dir):
    infra = pn.start_pid_infra(pin_dir)
    member = subprocess.Popen(["nsenter", f"--pid={infra.ns_path}", "--", "sleep", "300"])
    try:
        pn.stop_pid_infra(pin_dir)
        # The kernel kills every process of a PID namespace when its init dies.
        assert member.wait(timeout=5) != 0
    finally:
        if member.poll() is None:
            member.kill()
            member.wait()
    assert not pn.pid_infra_alive(pin_dir)
    assert not (pin_dir / pn.PID_INFRA_RECORD).exists()
    with pytest.raises(FailedPrecondition, match="PID namespace is gone"):
        pn.pid_infra_ns_path(pin_dir)
    pn.stop_pid_infra(pin_dir)


def test_second_pid_infra_is_refused_while_one_runs(pin_dir):
    pn.start_pid_infra(pin_dir)
    with pytest.raises(AlreadyExists):
        pn.start_pid_infra(pin_dir)


def test_stale_record_of_a_dead_infra_is_not_alive(pin_dir):
    infra = pn.start_pid_infra(pin_dir)
    os.kill(infra.pid, 9)
    deadline = time.monotonic() + 5
    while pn.pid_infra_alive(pin_dir) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pn.pid_infra_alive(pin_dir)
    # and a fresh one can start in its place
    assert pn.start_pid_infra(pin_dir).pid != infra.pid
