"""`pyshim migrate --direct`: the archive streamed from node A into node B's store, no registry in between;
and `pyshim checkpoint-image receive` refusing a stream that is not what the source wrote."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cri_api import api_pb2 as cri
from integration.test_checkpoint import COUNTER
from integration.test_migrate import (assert_consecutive, containers, log_ticks, pods, pyshim, run_pod)


@pytest.fixture
def nodes(two_nodes_clean):
    yield two_nodes_clean
    two_nodes_clean.remove_everything()


@pytest.fixture
def work_dir(tmp_path):
    d = tmp_path / "migrate"
    d.mkdir(mode=0o700)
    return d


def receiver(node) -> str:
    """What a user would run over ssh: `pyshim checkpoint-image receive` with the target daemon's store
    (here: in node B's network namespace, its stdin a pipe from the source)."""
    s = node.settings
    return " ".join(shlex.quote(a) for a in (*s.command_prefix, sys.executable, "-m", "pyshim", "checkpoint-image",
                                             "receive", "--config", str(s.config_file), "--root", str(s.root)))


def migrate_direct(source, target, cid: str, work_dir: Path, *extra: str, check: bool = True):
    return pyshim("migrate", cid, "--from", source.endpoint, "--to", target.endpoint, "--direct", receiver(target),
                  "--work-dir", str(work_dir), *extra, check=check)


def c_image_info(node, image: str) -> str:
    with node.client() as c:
        return c.images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=image), verbose=True)).info["info"]


def store_leftovers(node) -> list[str]:
    """Partial blobs or unpacks in the target's image store."""
    tmp = node.settings.root / "images" / "tmp"
    return sorted(os.listdir(tmp)) if tmp.is_dir() else []


def test_counter_moves_directly_without_gaps_and_its_images_land_unpacked(nodes, work_dir):
    _, cid = run_pod(nodes.a, nodes.busybox_ref, ["sh", "-c", COUNTER])
    time.sleep(1)

    report = json.loads(migrate_direct(nodes.a, nodes.b, cid, work_dir, "--json").stdout)
    assert not containers(nodes.a) and not pods(nodes.a)
    moved = report["target_container"]
    assert [c.id for c in containers(nodes.b)] == [moved]
    assert "transfer" in report["phases_ms"] and not {"push", "pull"} & set(report["phases_ms"])
    assert report["downtime_ms"] > 0 and report["transfer_mib_per_s"] > 0
    # The image is in B's store with its CRIU images unpacked during the transfer: the restore only linked them.
    with nodes.b.client() as c:
        image = c.images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=report["image"]))).image
    assert image.id
    layer = json.loads(c_image_info(nodes.b, report["image"]))["layers"][0]
    assert (nodes.b.settings.root / "images" / "checkpoints" / "sha256" / layer.split(":")[1]).is_dir()
    time.sleep(0.5)
    on_b = log_ticks(nodes.b, moved)
    assert on_b[0] == 0 and len(on_b) > 12
    assert_consecutive(on_b)
    assert not list(work_dir.iterdir()) and store_leftovers(nodes.b) == []


def test_a_receiver_that_fails_rolls_the_move_back_to_the_source(nodes, work_dir):
    _, cid = run_pod(nodes.a, nodes.busybox_ref, ["sh", "-c", COUNTER])
    time.sleep(1)
    # Says it is ready (the preflight passes), then refuses the archive: the container must run on A again.
    failing = f"sh -c 'case \"$*\" in *--check*) {receiver(nodes.b)} --check;; *) echo ready; head -c 1000 >/dev/null; exit 3;; esac' sh"
    proc = pyshim("migrate", cid, "--from", nodes.a.endpoint, "--to", nodes.b.endpoint, "--direct", failing,
                  "--work-dir", str(work_dir), check=False)
    assert proc.returncode == 1 and "exited 3" in proc.stderr and "rolled back" in proc.stderr, proc.stderr
    running = [c for c in containers(nodes.a) if c.state == cri.CONTAINER_RUNNING]
    assert len(running) == 1
    assert not containers(nodes.b) and not pods(nodes.b)
    assert store_leftovers(nodes.b) == []


# A transport that damages the stream on its way to the real receiver: `MODE RECEIVER...`.
# cut: passes the header and 64 KiB, then ends the stream; kill: the same, then SIGKILLs the receiver;
# flip: passes everything with one byte of the archive changed.
DAMAGING_TRANSPORT = r"""
import os, signal, subprocess, sys
mode, receiver = sys.argv[1], sys.argv[2:]
if "--check" in receiver:
    os.execvp(receiver[0], receiver)
proc = subprocess.Popen(receiver, stdin=subprocess.PIPE)
stdin = sys.stdin.buffer
header = stdin.readline()
proc.stdin.write(header)
if mode == "flip":
    data = bytearray()
    while not (data.endswith(b"}\n") and b"\0\0\0\0{" in data[-300:]):  # up to the trailer (the stream stays open)
        chunk = stdin.read1(1 << 20)
        if not chunk:
            break
        data += chunk
    data[data.rindex(b"\0\0\0\0{") - 1] ^= 0xFF  # the archive's last byte, just before the end frame
    proc.stdin.write(bytes(data))
    proc.stdin.flush()
    sys.exit(proc.wait())
proc.stdin.write(stdin.read(65536))
proc.stdin.flush()
if mode == "kill":
    proc.kill()
proc.stdin.close()
os.close(0)  # the sender sees a broken pipe, as when the connection to the target breaks
rc = proc.wait()
sys.exit(rc if rc >= 0 else 128 - rc)
"""


def images_of_the_move(node, cid: str) -> list[str]:
    """The target's images named for the move of `cid` (migrate tags them NAME-<cid[:12]>)."""
    with node.client() as c:
        return [t for i in c.images.ListImages(cri.ListImagesRequest()).images for t in i.repo_tags
                if cid[:12] in t]


@pytest.mark.parametrize("mode, says", [("cut", "was cut"), ("kill", "exited 137"),
                                        ("flip", "is not the one the source wrote")])
def test_a_damaged_stream_or_killed_receiver_rolls_back_and_leaves_nothing_on_the_target(nodes, work_dir, mode,
                                                                                         says):
    _, cid = run_pod(nodes.a, nodes.busybox_ref, ["sh", "-c", COUNTER])
    time.sleep(1)
    transport = " ".join(shlex.quote(a) for a in (sys.executable, "-c", DAMAGING_TRANSPORT, mode)) + " " + \
        receiver(nodes.b)
    proc = pyshim("migrate", cid, "--from", nodes.a.endpoint, "--to", nodes.b.endpoint, "--direct", transport,
                  "--work-dir", str(work_dir), check=False)
    assert proc.returncode == 1 and says in proc.stderr and "rolled back" in proc.stderr, proc.stderr
    running = [c for c in containers(nodes.a) if c.state == cri.CONTAINER_RUNNING]
    assert len(running) == 1
    assert not containers(nodes.b) and not pods(nodes.b)
    assert images_of_the_move(nodes.b, cid) == []
    # A killed receiver cannot clean up after itself: the next opener of the store (here the next
    # receiver's preflight) removes what it left, while the daemon keeps running.
    subprocess.run(["sh", "-c", f"{receiver(nodes.b)} --check"], check=True, capture_output=True)
    assert store_leftovers(nodes.b) == []
    assert not list((nodes.b.settings.root / "images" / "unsynced").glob("*")) \
        if (nodes.b.settings.root / "images" / "unsynced").is_dir() else True
    assert not list(work_dir.iterdir())


def test_receive_refuses_a_stream_that_does_not_match_its_digest_and_keeps_nothing(nodes, tmp_path):
    archive = tmp_path / "ck.tar"
    _, cid = run_pod(nodes.a, nodes.busybox_ref, ["sh", "-c", COUNTER])
    with nodes.a.client() as c:
        c.runtime.CheckpointContainer(cri.CheckpointContainerRequest(container_id=cid, location=str(archive)))
    data = archive.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    tampered = bytearray(data)
    tampered[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.tar").write_bytes(tampered)
    images_before = (nodes.b.settings.root / "images" / "images.json").read_bytes() \
        if (nodes.b.settings.root / "images" / "images.json").exists() else b""
    with open(tmp_path / "bad.tar", "rb") as stdin:
        proc = subprocess.run(["sh", "-c", f"{receiver(nodes.b)} --tag localhost/x/bad:1 --digest {digest} "
                                           f"--size {len(data)}"], stdin=stdin, capture_output=True, text=True)
    assert proc.returncode == 1 and "does not match" in proc.stderr, proc.stderr
    assert store_leftovers(nodes.b) == []
    assert not (nodes.b.settings.root / "images" / "checkpoints" / "sha256" / digest.split(":")[1]).exists()
    assert not (nodes.b.settings.root / "images" / "blobs" / "sha256" / digest.split(":")[1]).exists()
    after = (nodes.b.settings.root / "images" / "images.json").read_bytes() \
        if (nodes.b.settings.root / "images" / "images.json").exists() else b""
    assert after == images_before


def test_the_source_reports_the_digest_of_the_archive_it_wrote(nodes, tmp_path):
    from pyshim.migration.workload import checkpoint_and_stop
    archive = tmp_path / "ck.tar"
    _, cid = run_pod(nodes.a, nodes.busybox_ref, ["sh", "-c", COUNTER])
    with nodes.a.client() as c:
        figures = checkpoint_and_stop(c, cid, str(archive), timeout=120, throwaway_archive=True)
    data = archive.read_bytes()
    assert figures["archive"] == {"digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                                  "diffId": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert figures["stopped"] and figures["archiveBytes"] == len(data)
