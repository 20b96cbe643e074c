"""[checkpoint] criu_kdat_cache: on a host whose /run is not a tmpfs, pyshim gives CRIU its
kernel-feature cache, which CRIU then loads instead of probing the kernel."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from criu_glue import kdat_cache


def test_a_primed_cache_is_the_one_criu_writes_and_criu_loads_it(tmp_path):
    primed = kdat_cache.prime(run_dir=tmp_path)
    assert primed.path == tmp_path / "criu.kdat" and primed.size == primed.path.stat().st_size > 0
    assert primed.path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["criu.kdat"], "temporary file left behind"
    # Nothing of the private /run reached the host's mount table.
    assert "criu-kdat" not in Path("/proc/self/mountinfo").read_text()
    # CRIU reads /run/criu.kdat only: in a private namespace of the test's own, with the primed file there.
    log = tmp_path / "check.log"
    script = f'mount -t tmpfs tmpfs /run && cp "{primed.path}" /run/criu.kdat && criu check -v4 -o "{log}"'
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], check=True,
                   capture_output=True, timeout=60)
    assert "Loaded kdat cache from /run/criu.kdat" in log.read_text()


def test_the_daemon_primes_the_host_cache_when_run_is_not_a_tmpfs(daemon):
    if kdat_cache.is_tmpfs(Path("/run")):
        pytest.skip("/run is a tmpfs here: CRIU keeps its cache itself")
    # The session daemon primed it in the background at its start.
    import time
    deadline = time.monotonic() + 30
    while not Path("/run/criu.kdat").is_file():
        assert time.monotonic() < deadline, "the daemon wrote no /run/criu.kdat"
        time.sleep(0.2)
    assert "CRIU kernel-feature cache written" in daemon.log_path.read_text()
