import subprocess
import time

from pyshim.internal import proctree


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_family_ends_descendants_and_orphans_of_the_session_but_not_others(tmp_path):
    bystander = subprocess.Popen(["sleep", "600"])
    # A session leader with a child, a grandchild, and an orphan (its parent exited at once).
    leader = subprocess.Popen(["sh", "-c", f"sleep 601 & (sh -c 'sleep 602') & (sleep 603 &) ; "
                               f"echo $! > {tmp_path}/ready; wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "ready").exists() or len(proctree.family([leader.pid])) < 5:
            assert time.monotonic() < deadline, proctree.family([leader.pid])
            time.sleep(0.05)
        members = proctree.family([leader.pid])
        assert bystander.pid not in members
        killed = proctree.kill_family([leader.pid])
        assert members <= killed
        leader.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in killed):
            assert time.monotonic() < deadline, [p for p in killed if _alive(p)]
            time.sleep(0.05)
        assert _alive(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()


def test_family_of_a_gone_process_is_empty():
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert proctree.family([proc.pid]) == set()
