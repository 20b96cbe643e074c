"""`make conformance`: the CRI validation suite (critest) against a pyshim daemon of its own.

It starts a loopback docker-registry and a daemon (temporary socket, root, state dir, bridge and
subnet), provides the images critest names (stand-ins built here, see images.py) in that registry,
which the daemon uses as the mirror of every registry critest names (gcr.io, registry.k8s.io,
k8s.gcr.io), runs critest, and prints ginkgo's summary. `--registry-prefix` runs critest with
`-registry-prefix` instead of mirrors, as runtimes without mirrors are tested (critest then drops
tags and digests, which fails the Image Manager and image consistency specs). Whatever happens (a failure, Ctrl-C, SIGTERM), it
then removes every pod and container, stops the daemon and the registry, and deletes the bridge,
the cgroups and the temporary directories; it reports anything that stayed behind.

    make conformance                              # every spec
    make conformance ARGS="--busybox-only"        # the busybox-only reference subset
    make conformance ARGS="--focus 'Container' --log-dir /tmp/conf"   # keep critest's and the daemon's logs
    make conformance ARGS="--registry-prefix"     # critest -registry-prefix, no mirrors

critest comes from $CRITEST, else ../shared/tools/cri-tools/critest beside the project.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
SHARED_CRITEST = PROJECT.parent / "shared" / "tools" / "cri-tools" / "critest"
# The specs that need more than busybox: cri-tools' README names this subset as the reference for
# runtimes without the other test images.
BUSYBOX_ONLY_SKIP = ("Image Manager|port mapping|Multiple Containers|portforward|HostPID|PodPID|"
                     "ContainerPID|NoNewPrivs")
SUBNET = "10.89.0.0/22"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
CRITEST_STOP_TIMEOUT = 10.0
HOW_TO_GET_CRITEST = """critest was not found ({where}).
Get it, then point CRITEST at it:
  - a release binary: https://github.com/kubernetes-sigs/cri-tools/releases (critest-VERSION-linux-amd64.tar.gz)
  - or from source: git clone https://github.com/kubernetes-sigs/cri-tools && cd cri-tools && make critest
    (with the vendored modules offline: GOFLAGS=-mod=vendor GOPROXY=off make critest)
  CRITEST=/path/to/critest make conformance"""


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived: stop, clean up, exit."""


def find_critest() -> Path:
    configured = os.environ.get("CRITEST")
    candidate = Path(configured) if configured else SHARED_CRITEST
    if not os.access(candidate, os.X_OK) or not candidate.is_file():
        where = f"CRITEST={configured}" if configured else f"CRITEST is unset and {SHARED_CRITEST} is missing"
        sys.exit(HOW_TO_GET_CRITEST.format(where=where))
    return candidate


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make conformance ARGS=...", description=__doc__.split("\n\n")[0])
    parser.add_argument("--busybox-only", action="store_true",
                        help=f"skip the specs that need more than busybox ({BUSYBOX_ONLY_SKIP})")
    parser.add_argument("--skip", default="", help="regex of specs to skip (ginkgo.skip), besides --busybox-only")
    parser.add_argument("--focus", default="", help="regex of the specs to run (ginkgo.focus)")
    parser.add_argument("--log-dir", type=Path, help="keep critest's output and the daemon's log there")
    parser.add_argument("--registry-prefix", action="store_true",
                        help="run critest with -registry-prefix (no mirrors; tags and digests are dropped)")
    parser.add_argument("critest_args", nargs="*", help="more critest flags, after --")
    return parser.parse_args(argv)


def critest_command(critest: Path, socket: Path, registry: str, args: argparse.Namespace) -> list[str]:
    endpoint = f"unix://{socket}"
    command = [str(critest), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint]
    if args.registry_prefix:
        command += ["-registry-prefix", registry]
    skip = "|".join(s for s in (BUSYBOX_ONLY_SKIP if args.busybox_only else "", args.skip) if s)
    if skip:
        command += ["-ginkgo.skip", skip]
    if args.focus:
        command += ["-ginkgo.focus", args.focus]
    if not sys.stdout.isatty():
        command.append("-ginkgo.no-color")
    return command + list(args.critest_args)


def summary(output: str) -> str:
    """ginkgo's closing part: the failures it summarizes, 'Ran N of M Specs' and the counts."""
    lines = _ANSI_ESCAPE.sub("", output).splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Summarizing ")), None)
    if start is None:
        start = next((i for i, line in enumerate(lines) if line.startswith("Ran ")), len(lines))
    return "\n".join(line for line in lines[start:] if line.strip())


def run_critest(command: list[str], tmp: Path, output_path: Path) -> tuple[int, str]:
    """Run critest (its temporary files under `tmp`), echoing its output; returns (exit code, output)."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    print("+ " + " ".join(f"'{c}'" if " " in c or "|" in c else c for c in command), flush=True)
    with open(output_path, "wb") as out:
        # A session of its own: a Ctrl-C reaches this script, which then stops critest and cleans up.
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                out.write(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            code = proc.wait()
        finally:
            stop_process_group(proc)
    return code, output_path.read_text(errors="replace")


def stop_process_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, CRITEST_STOP_TIMEOUT), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def import_into_store(layout: Path, root: Path) -> None:
    """`pyshim image import` of a layout naming the image under all its original names."""
    subprocess.run([sys.executable, "-m", "pyshim", "image", "import", str(layout), "--root", str(root)],
                   check=True, stdout=subprocess.DEVNULL)


def _raise_interrupted(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    critest = find_critest()
    if os.geteuid() != 0:
        sys.exit("make conformance needs root (it runs pods with runc, CNI and iptables)")
    # Imported here so that `--help` and a missing critest need no installed project.
    from integration.conformance.images import build_layouts, mirrors_for, push_to_registry
    from integration.daemon import Daemon, DaemonSettings, leftovers, remove_cgroup_tree, remove_everything
    from integration.registry_server import RegistryServer

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    base = Path(tempfile.mkdtemp(prefix="pyshim-conf-", dir="/tmp"))  # short: unix socket paths
    log_dir = args.log_dir.resolve() if args.log_dir else None
    # Everything started from here inherits this directory: what writes into its working directory
    # (conmon writes an `oom` file there when a container is OOM-killed) writes into ours.
    os.chdir(base)
    suffix = uuid.uuid4().hex[:4]
    settings = DaemonSettings(base=base / "d", bridge=f"pyconf{suffix}", subnet=SUBNET,
                              netns_prefix=f"pyconf{suffix}-")
    registry, daemon, code = RegistryServer(), Daemon(settings), 1
    left: list[str] = []
    try:
        registry.start()
        print(f"registry on {registry.address}; building the stand-in images", flush=True)
        built = build_layouts(Path(tempfile.mkdtemp(dir=base)))
        push_to_registry(built, registry.address)
        if not args.registry_prefix:
            settings.mirrors = mirrors_for(built, registry.address)
        daemon.start()
        if args.registry_prefix:
            for image, layout in built:
                if image.in_store:
                    import_into_store(layout, settings.root)
        print(f"daemon on {settings.socket}", flush=True)
        tmp = base / "critest-tmp"
        tmp.mkdir()
        started = time.monotonic()
        code, output = run_critest(critest_command(critest, settings.socket, registry.address, args),
                                   tmp, base / "critest.log")
        print(f"\n==== critest summary (exit {code}, {time.monotonic() - started:.0f} s) ====")
        print(summary(output))
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\ninterrupted ({exc or 'SIGINT'}): cleaning up", file=sys.stderr)
        code = 130
    finally:
        # Signals now would cut the cleanup short: it is what makes an interrupted run safe.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        os.chdir(PROJECT)
        left = _clean_up(daemon, registry, settings, base, log_dir,
                         leftovers, remove_cgroup_tree, remove_everything)
    if left:
        print(f"left behind: {left}", file=sys.stderr)
        return code or 1
    return code


def _clean_up(daemon, registry, settings, base: Path, log_dir: Path | None,
              leftovers, remove_cgroup_tree, remove_everything) -> list[str]:
    left: list[str] = []
    if daemon.process and daemon.process.poll() is None:
        try:
            with daemon.client(timeout=60) as client:
                pods, containers = remove_everything(client)
            if pods or containers:
                print(f"removed {len(pods)} pod(s) and {len(containers)} container(s) critest left",
                      file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - report and go on cleaning
            left.append(f"could not remove pods and containers: {exc}")
    daemon.stop()
    left += leftovers(settings)
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
        for src in (base / "critest.log", daemon.log_path):
            if src.exists():
                shutil.copy(src, log_dir / src.name)
        print(f"logs kept in {log_dir}", file=sys.stderr)
    subprocess.run(["ip", "link", "del", settings.bridge], capture_output=True)
    left += remove_cgroup_tree(settings.cgroup_parent)
    registry.stop()
    mounted = _mounts_under(base)
    if mounted:
        # rmtree would descend into them: leave the directory to a human.
        left += [f"mount {m}" for m in mounted if f"mount {m}" not in left]
    else:
        shutil.rmtree(base, ignore_errors=True)
    return left


def _mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    return [p for p in points if p == str(base) or p.startswith(f"{base}/")]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
