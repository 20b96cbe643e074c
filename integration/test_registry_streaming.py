"""Large layers stream through the registry: pushing and pulling a ~400 MiB checkpoint image never
holds the layer in memory, on either side (issue 5: "neither side holds a whole layer in memory").

The layer is a real checkpoint archive whose rootfs diff carries 400 MiB of random bytes (so no
compression can shrink it). Peaks are measured where they happen: ru_maxrss of the child process that
runs `pyshim checkpoint-image build`/`push` or RegistryClient.pull, and the daemon's VmHWM across
PullImage (reset with clear_refs just before). Each peak must stay far below the blob's size.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cri_api import api_pb2 as cri
from integration.test_checkpoint import checkpoint
from integration.test_lifecycle import cleanup, run_container
from integration.test_restore import log_texts

MiB = 1 << 20
BLOB_MIB = 400
# Python, gRPC and the modules loaded are in the baseline; what the transfer adds must stay below this.
MAX_GROWTH_MIB = 96

FILL = (f"dd if=/dev/urandom of=/big bs=1M count={BLOB_MIB} 2>/dev/null && sync && echo filled && "
        "exec sleep 1000000")

PULL_IN_CHILD = """
import sys
from pathlib import Path
from oci.registry import RegistryClient
from oci.store import ImageStore
record = RegistryClient().pull(ImageStore(Path(sys.argv[1])), sys.argv[2])
print(record.layers[0].size)
"""
# The control: the same pull with a store that reads each blob whole before writing it. The meter must
# see that, or a pass above would prove nothing.
PULL_IN_CHILD_BUFFERED = """
import io, sys
from pathlib import Path
from oci.registry import RegistryClient
from oci.store import ImageStore
original = ImageStore.write_blob
ImageStore.write_blob = lambda self, stream, *a, **k: original(self, io.BytesIO(stream.read()), *a, **k)
RegistryClient().pull(ImageStore(Path(sys.argv[1])), sys.argv[2])
"""
IMPORTS_ONLY = """
import pyshim.cli, oci.registry, oci.store, criu_glue.checkpoint_image, criu_glue.archive
"""


# Runs argv[2:] and writes its peak RSS (KiB) to argv[1]. Why a launcher: a child forked straight
# from pytest inherits pytest's RSS as its starting peak (ru_maxrss survives exec), which grows with
# the session and hid the difference the control below looks for.
_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def measured(argv: list[str], timeout: float = 600) -> tuple[int, str, str, int]:
    """Run argv to completion; (exit code, stdout, stderr, peak RSS in KiB) of exactly that process."""
    out_r, out_w = os.pipe()
    err_path = Path(f"/tmp/pyshim-measured-{os.getpid()}-{uuid.uuid4().hex[:6]}.err")
    peak_path = err_path.with_suffix(".peak")
    argv = [sys.executable, "-c", _LAUNCHER, str(peak_path), *argv]
    with open(err_path, "wb") as err_f, os.fdopen(out_r, "rb") as out_f:
        proc = subprocess.Popen(argv, stdout=out_w, stderr=err_f, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        os.close(out_w)
        deadline = time.monotonic() + timeout
        out = out_f.read()  # until the child closes stdout (it exits)
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{argv} did not finish in {timeout}s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits for it again
    err = err_path.read_text(errors="replace")
    err_path.unlink()
    peak = int(peak_path.read_text())
    peak_path.unlink()
    return proc.returncode, out.decode(errors="replace"), err, peak


def pyshim(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyshim", *args]


def wait_for_log(client, cid, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"{text}\n" in log_texts(client, cid):
            return
        time.sleep(0.2)
    raise AssertionError(f"container never logged {text!r}: {log_texts(client, cid)}")


@pytest.fixture
def big_archive(client, pulled_busybox, tmp_path):
    """A real checkpoint archive carrying 400 MiB of random bytes in its rootfs diff."""
    archive = tmp_path / "big.tar"
    _, pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", FILL])
    try:
        wait_for_log(client, cid, "filled")
        checkpoint(client, cid, archive, timeout=300)
    finally:
        cleanup(client, pod_id)
    assert archive.stat().st_size >= BLOB_MIB * MiB
    yield archive
    archive.unlink(missing_ok=True)


def test_a_400_mib_checkpoint_image_is_built_pushed_and_pulled_without_holding_it_in_memory(
        client, daemon, registry, big_archive, tmp_path):
    growth_limit_kib = MAX_GROWTH_MIB * 1024
    code, _, err, baseline = measured([sys.executable, "-c", IMPORTS_ONLY])
    assert code == 0, err
    store = tmp_path / "build-store"
    pulled = tmp_path / "pull-store"
    ref = f"{registry.address}/checkpoints/big-{uuid.uuid4().hex[:8]}:v1"
    peaks = {}
    try:
        code, out, err, peaks["build"] = measured(pyshim("checkpoint-image", "build", str(big_archive),
                                                         "--tag", ref, "--root", str(store)))
        assert code == 0, err
        code, out, err, peaks["push"] = measured(pyshim("checkpoint-image", "push", ref, "--root", str(store)))
        assert code == 0, err
        code, out, err, peaks["pull (RegistryClient)"] = measured([sys.executable, "-c", PULL_IN_CHILD,
                                                                   str(pulled), ref])
        assert code == 0, err
        layer_size = int(out)
        assert layer_size >= BLOB_MIB * MiB

        # The daemon: its peak across one PullImage, from its RSS just before.
        daemon.reset_peak_rss()
        before = daemon.rss_kib
        assert daemon.hwm_kib <= before + 1024, "clear_refs did not reset VmHWM"
        image_ref = client.pull(ref)
        daemon_growth = daemon.hwm_kib - before
        try:
            status = client.images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)),
                                               timeout=client.timeout)
            assert status.image.id == image_ref and status.image.size >= layer_size
        finally:
            client.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)), timeout=client.timeout)

        code, _, err, buffered = measured([sys.executable, "-c", PULL_IN_CHILD_BUFFERED,
                                           str(tmp_path / "control-store"), ref])
        assert code == 0, err
        assert buffered - baseline > max(growth_limit_kib, layer_size // 1024 // 2), \
            f"the meter missed a pull that buffers the layer: {buffered - baseline} KiB over baseline"

        report = {name: f"{(peak - baseline) / 1024:.0f} MiB over the {baseline / 1024:.0f} MiB baseline"
                  for name, peak in peaks.items()}
        report["daemon PullImage"] = f"{daemon_growth / 1024:.0f} MiB over its RSS before"
        print(f"\nlayer {layer_size / MiB:.0f} MiB; peak RSS growth: {report}")
        too_big = {name: peak - baseline for name, peak in peaks.items() if peak - baseline > growth_limit_kib}
        if daemon_growth > growth_limit_kib:
            too_big["daemon PullImage"] = daemon_growth
        assert not too_big, (f"these held (part of) the {layer_size / MiB:.0f} MiB layer in memory "
                             f"(KiB over baseline, limit {growth_limit_kib}): {too_big}; all: {report}")
    finally:
        subprocess.run(["rm", "-rf", str(store), str(pulled), str(tmp_path / "control-store")])
