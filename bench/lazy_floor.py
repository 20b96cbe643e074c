"""The floors of the lazy (post-copy) benchmarks: bare runc and CRIU, no pyshim, measured in the same run.

What pyshim's lazy paths wrap, run by hand on a container pyshim runs (same runc root, same config.json,
same memory), as README "Lazy (post-copy) restore" and "Moving a container lazily" write them down:

- dump (a move only): `runc checkpoint --leave-running --file-locks --lazy-pages --page-server A:P
  --status-fd N`, from its start to CRIU's byte on N (all but the memory dumped, the page server
  listening): the floor of CheckpointContainer's "dump" phase (pyshim pauses the container first);
- lazy-pages: `criu lazy-pages -D IMAGES -W WORK --status-fd N [--page-server --address A --port P]`,
  from its start to its byte on N (it listens on WORK/lazy-pages.socket);
- restore: `runc restore -d --lazy-pages --file-locks --manage-cgroups-mode=ignore` of those images into a
  copy of the container's bundle (a cgroup of its own), from its start to its return: the process
  tree runs, its memory still to come;
- pages: from the restore's return to the lazy-pages daemon's exit (every page in place).

Page source: the dump's page server (a move) or the images of an eager `runc checkpoint` (a local lazy
restore; that dump is not timed). The bare daemon logs at CRIU's default level, pyshim's at -v4 (it
reads its progress from the log): the difference is pyshim's. The restored copy is killed and deleted
at the end; the source container runs on (--leave-running).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from criu_glue.lazy_pages import PageServer

_READY_TIMEOUT = 120.0
_PAGES_TIMEOUT = 300.0


@dataclass
class Floor:
    dump_ms: float = float("nan")  # bare lazy dump to "serving" (a move); nan for a local restore
    lazy_pages_ms: float = 0.0     # bare `criu lazy-pages` start to listening
    restore_ms: float = 0.0        # bare `runc restore -d --lazy-pages` start to return
    pages_ms: float = 0.0          # restore returned -> every page in place (the daemon exited)

    @property
    def start_ms(self) -> float:
        """What a lazy StartContainer wraps at least: the daemon's start and the restore."""
        return self.lazy_pages_ms + self.restore_ms

    def __str__(self) -> str:
        dump = "" if self.dump_ms != self.dump_ms else f"lazy dump {self.dump_ms:.0f}, "
        return (f"{dump}lazy-pages start {self.lazy_pages_ms:.0f} + runc restore {self.restore_ms:.0f} = "
                f"{self.start_ms:.0f}, pages after {self.pages_ms:.0f}")


def measure(runc_root: Path, container_id: str, scratch: Path, page_server: PageServer | None = None,
            source_prefix: tuple[str, ...] = (), target_prefix: tuple[str, ...] = ()) -> Floor:
    """One bare lazy dump (with `page_server`) or eager dump (without), then one bare lazy restore of it.
    `*_prefix`: what runs a command on the source/target node (nsenter into its netns)."""
    floor = Floor()
    images, dump_work, restore_work = scratch / "images", scratch / "dump-work", scratch / "restore-work"
    target_images, bundle, root = scratch / "target-images", scratch / "bundle", scratch / "runc-root"
    for d in (images, dump_work, restore_work, target_images, bundle, root):
        d.mkdir(parents=True, mode=0o700)
    runc = ["runc", "--root", str(runc_root)]
    dump: subprocess.Popen | None = None
    daemon: subprocess.Popen | None = None
    infra: tuple[subprocess.Popen, int] | None = None
    restored = f"floor-{uuid.uuid4().hex[:8]}"
    try:
        state = json.loads(subprocess.run([*runc, "state", container_id], capture_output=True, text=True,
                                          check=True).stdout)
        spec = json.loads((Path(state["bundle"]) / "config.json").read_text())
        spec["linux"]["cgroupsPath"] = spec["linux"]["cgroupsPath"] + "-floor"
        pid_ns = next((ns for ns in spec["linux"]["namespaces"] if ns["type"] == "pid" and ns.get("path")), None)
        if pid_ns is not None:
            # The pod's process namespace holds the source's PIDs: the copy gets a new one, as a new pod's.
            infra = _pid_namespace_holder()
            pid_ns["path"] = f"/proc/{infra[1]}/ns/pid"
        spec["root"]["path"] = str(Path(state["bundle"]) / spec["root"]["path"]) \
            if not spec["root"]["path"].startswith("/") else spec["root"]["path"]
        (bundle / "config.json").write_text(json.dumps(spec))
        checkpoint = [*source_prefix, *runc, "checkpoint", "--leave-running", "--file-locks", "--image-path",
                      str(images), "--work-path", str(dump_work)]
        if page_server is None:
            subprocess.run([*checkpoint, container_id], capture_output=True, text=True, check=True, timeout=600)
        else:
            started = time.perf_counter()
            dump = _start_ready(lambda fd: [*checkpoint, "--lazy-pages", "--page-server", str(page_server),
                                            "--status-fd", str(fd), container_id], dump_work / "runc.log", dump_work)
            floor.dump_ms = _ms(started)
        if page_server is None:  # a local restore reads the dump's own images
            target_images = images
        else:
            for item in images.iterdir():  # what the archive carries to the target (untimed)
                shutil.copy2(item, target_images / item.name)
        lazy_source = [] if page_server is None else ["--page-server", "--address", page_server.address, "--port",
                                                      str(page_server.port)]
        started = time.perf_counter()
        daemon = _start_ready(lambda fd: [*target_prefix, "criu", "lazy-pages", "-D", str(target_images), "-W",
                                          str(restore_work), "-o", "lazy-pages.log", "--status-fd", str(fd),
                                          *lazy_source], restore_work / "daemon.out", restore_work)
        floor.lazy_pages_ms = _ms(started)
        # Its output to a file, not a pipe: the restored processes get runc's stdio in place of the pipes
        # they had (runc's descriptors.json), and would hold a pipe open for as long as they live.
        with open(restore_work / "runc.out", "wb") as out:
            started = time.perf_counter()
            subprocess.run([*target_prefix, "runc", "--root", str(root), "restore", "-d", "--lazy-pages",
                            "--file-locks", "--manage-cgroups-mode=ignore", "--image-path", str(target_images),
                            "--work-path", str(restore_work), "--bundle", str(bundle), restored],
                           stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True, timeout=600)
            floor.restore_ms = _ms(started)
        started = time.perf_counter()
        daemon.wait(timeout=_PAGES_TIMEOUT)
        floor.pages_ms = _ms(started)
        if daemon.returncode != 0:
            raise RuntimeError(f"bare criu lazy-pages exited {daemon.returncode}: "
                               f"{_tail(restore_work / 'lazy-pages.log')}")
    except subprocess.CalledProcessError as e:
        said = e.stderr.strip() if e.stderr else _tail(restore_work / "runc.out")
        raise RuntimeError(f"bare floor: {' '.join(e.cmd[-3:])} exited {e.returncode}: {said}; "
                           f"CRIU: {_errors(restore_work / 'restore.log')} {_errors(dump_work / 'dump.log')} "
                           f"lazy-pages: {_errors(restore_work / 'lazy-pages.log')}") from None
    finally:
        for proc in (daemon, dump):
            if proc is not None:
                _end(proc, grace=0 if proc is daemon else 30)
        subprocess.run(["runc", "--root", str(root), "delete", "--force", restored], capture_output=True)
        if infra is not None:
            _end(infra[0], grace=0)
        shutil.rmtree(scratch, ignore_errors=True)
    return floor


def _pid_namespace_holder() -> tuple[subprocess.Popen, int]:
    """`unshare --pid --fork sleep`: (the unshare process, the sleep's host pid: PID 1 of a new namespace)."""
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "sleep", "100000"], start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return proc, int(children[0])
        time.sleep(0.005)
    _end(proc, grace=0)
    raise RuntimeError("unshare --pid --fork started no process")


def _start_ready(command, log: Path, cwd: Path) -> subprocess.Popen:
    """Start `command(status_fd)` in a session of its own and return once it wrote its status byte."""
    ready_r, ready_w = os.pipe()
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(command(ready_w), pass_fds=(ready_w,), cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, start_new_session=True)
        os.close(ready_w)
        ready_w = -1
        ready, _, _ = select.select([ready_r], [], [], _READY_TIMEOUT)
        byte = os.read(ready_r, 1) if ready else b""
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    if byte != b"\0":
        _end(proc, grace=0)
        raise RuntimeError(f"bare {' '.join(command(0)[:4])} never became ready: {_tail(log)} "
                           f"{_tail(cwd / 'dump.log')} {_tail(cwd / 'lazy-pages.log')}")
    return proc


def _end(proc: subprocess.Popen, grace: float) -> None:
    """Let it finish for `grace` seconds, then kill its session (CRIU included)."""
    try:
        proc.wait(timeout=grace if grace > 0 else 0.001)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _errors(log: Path) -> str:
    """CRIU's error lines (and the line before each) of `log`."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " / ".join(f"{lines[i - 1].strip()} | {lines[i].strip()}" for i, line in enumerate(lines)
                      if i and "Error" in line)[-1500:]


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
