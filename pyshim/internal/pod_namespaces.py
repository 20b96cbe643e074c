"""Per-pod IPC, UTS and PID namespaces without a pause container.

IPC and UTS namespaces live on without any process in them once bind-mounted onto a
file, so they are pinned that way, and every container of the pod joins them by path.

A PID namespace cannot be pinned: it dies with its init. For PID namespace mode POD
the pod gets a tiny infra process instead, PID 1 of a fresh PID namespace, which
containers join through /proc/<pid>/ns/pid.

Namespaces are made by util-linux `unshare`, not by unshare(2) through ctypes:
unshare(2) and setns(2) change the calling thread, and the daemon is a threaded gRPC
server, so every other request on that thread would run in the pod's namespaces until
switched back (and a PID namespace only applies to children anyway). Forking a Python
child from a threaded process to do it is no safer. The `unshare` binary does the
switch in a process of its own, and its --ipc=FILE/--uts=FILE options are exactly
"create a namespace and pin it with a bind mount".
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pyshim.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument
from pyshim.internal.netns import is_ns_pin, unmount_ns_pin
from pyshim.internal.pod_files import validate_hostname

PINNABLE_KINDS = ("ipc", "uts")
UNSHARE_OPTION = {"ipc": "--ipc", "uts": "--uts"}

PID_INFRA_RECORD = "pid-infra.json"
PID_INFRA_PIDFILE = "pid-infra.pid"
PID_INFRA_LOG = "pid-infra.log"
PID_INFRA_START_TIMEOUT = 5.0
PID_INFRA_STOP_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0

# Runs as PID 1 of the new PID namespace. It first writes its own pid as the host sees
# it (/proc is still the host's procfs, so /proc/self/stat gives the host pid), then
# becomes `sleep infinity` with SIGCHLD ignored. An ignored SIGCHLD makes the kernel
# reap every child at once, including the orphans PID 1 adopts: zombie reaping with no
# code running at all, in the smallest process on the host (coreutils sleep). The
# ignored disposition survives exec; `env --ignore-signal` sets it since a shell's
# `trap '' CHLD` does not reliably reach the exec'd program.
# It is named "pause", like the pause container of containerd and CRI-O: a PID 1 named "sleep"
# would be found by `pgrep sleep` and killed by `pkill sleep` in any container of the pod (critest's
# ExecSync-timeout spec looks for leftover sleeps so). The kernel names a process after the path it
# was executed by, so $2 is a symlink "pause" to sleep.
_PID_INFRA_SCRIPT = (
    'read -r pid rest < /proc/self/stat && echo "$pid" > "$1" && '
    'exec env --ignore-signal=CHLD "$2" infinity'
)
PID_INFRA_NAME = "pause"
_SET_HOSTNAME_SCRIPT = 'printf %s "$1" > /proc/sys/kernel/hostname'


@dataclass(frozen=True)
class InfraProcess:
    pid: int
    ns_path: Path
    # Kernel start time (clock ticks since boot) tells the infra from a later process
    # that reuses its pid after a host reboot or a long uptime.
    start_time: int


def pin_namespaces(pin_dir: Path, hostname: str, kinds: tuple[str, ...] = PINNABLE_KINDS) -> dict[str, Path]:
    """Create new namespaces of `kinds` pinned at pin_dir/<kind>; return kind -> pin path.

    The UTS namespace gets `hostname` set. Raises AlreadyExists if a pin is in place.
    """
    pin_dir = Path(pin_dir)
    kinds = tuple(kinds)
    _check_kinds(kinds)
    if "uts" in kinds:
        validate_hostname(hostname)
    if not kinds:
        return {}
    pin_dir.mkdir(parents=True, exist_ok=True)
    pins = {kind: pin_dir / kind for kind in kinds}
    for kind, pin in pins.items():
        if is_ns_pin(pin):
            raise AlreadyExists(f"{kind} namespace already pinned at {pin}")
        pin.touch()  # unshare bind-mounts onto an existing file

    command = [_require_binary("unshare")]
    command += [f"{UNSHARE_OPTION[kind]}={pin}" for kind, pin in pins.items()]
    if "uts" in kinds:
        command += ["--", "/bin/sh", "-c", _SET_HOSTNAME_SCRIPT, "pyshim-set-hostname", hostname]
    else:
        command += ["--", "/bin/true"]
    try:
        _run(command, f"pinning {'/'.join(kinds)} namespaces in {pin_dir}")
        for kind, pin in pins.items():
            if not is_ns_pin(pin):
                raise Internal(f"unshare exited 0 but left no {kind} namespace mounted at {pin}")
    except BaseException:
        _unpin(pins.values())
        raise
    return pins


def unpin_namespaces(pin_dir: Path) -> None:
    """Release pinned IPC/UTS namespaces in pin_dir; a no-op for those already gone."""
    _unpin(Path(pin_dir) / kind for kind in PINNABLE_KINDS)


def start_pid_infra(pin_dir: Path) -> InfraProcess:
    """Start the pod's PID-namespace infra process and record it in pin_dir.

    It runs in a session of its own and is not the daemon's child, so it lives on
    across daemon restarts and never needs reaping by the daemon.
    """
    pin_dir = Path(pin_dir)
    pin_dir.mkdir(parents=True, exist_ok=True)
    existing = load_pid_infra(pin_dir)
    if existing is not None:
        raise AlreadyExists(f"pid infra process {existing.pid} already runs for {pin_dir}")
    pidfile = pin_dir / PID_INFRA_PIDFILE
    pidfile.unlink(missing_ok=True)
    program = pin_dir / PID_INFRA_NAME
    program.unlink(missing_ok=True)
    program.symlink_to(_require_binary("sleep"))

    command = [
        _require_binary("setsid"), "--fork",
        _require_binary("unshare"), "--pid", "--fork", "--kill-child",
        "/bin/sh", "-c", _PID_INFRA_SCRIPT, "pyshim-pid-infra", str(pidfile), str(program),
    ]  # fmt: skip
    with open(pin_dir / PID_INFRA_LOG, "ab") as log:
        # setsid --fork returns at once; its grandchild is re-parented to the host's init.
        _run(command, f"starting pid infra process for {pin_dir}", stderr=log)

    pid = _wait_for_pidfile(pidfile, pin_dir)
    try:
        infra = InfraProcess(pid=pid, ns_path=Path(f"/proc/{pid}/ns/pid"), start_time=_start_time(pid))
        _check_is_pid_namespace_init(infra)
        _wait_for_exec(pid, pin_dir)
        _write_record(pin_dir, infra)
    except BaseException:
        _kill_and_wait(pid)
        raise
    finally:
        pidfile.unlink(missing_ok=True)
    return infra


def load_pid_infra(pin_dir: Path) -> InfraProcess | None:
    """The recorded infra process if it is still alive, else None (e.g. after a reboot)."""
    record = Path(pin_dir) / PID_INFRA_RECORD
    try:
        data = json.loads(record.read_text())
        infra = InfraProcess(pid=int(data["pid"]), ns_path=Path(data["ns_path"]), start_time=int(data["start_time"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Internal(f"reading pid infra record {record}: {exc}") from exc
    return infra if _is_same_live_process(infra) else None


def pid_infra_alive(pin_dir: Path) -> bool:
    return load_pid_infra(pin_dir) is not None


def pid_infra_ns_path(pin_dir: Path) -> Path:
    """The PID namespace a container of the pod joins; FailedPrecondition if it died."""
    infra = load_pid_infra(pin_dir)
    if infra is None:
        raise FailedPrecondition(
            f"the pod's PID namespace is gone: no live pid infra process recorded in {pin_dir}"
        )
    return infra.ns_path


def stop_pid_infra(pin_dir: Path) -> None:
    """Kill the infra process, and with it every process of the pod's PID namespace.

    Idempotent: no record or a dead process is not an error.
    """
    pin_dir = Path(pin_dir)
    infra = load_pid_infra(pin_dir)
    if infra is not None:
        _kill_and_wait(infra.pid, infra.start_time)
    for name in (PID_INFRA_RECORD, PID_INFRA_PIDFILE, PID_INFRA_LOG):
        (pin_dir / name).unlink(missing_ok=True)


def pid_infra_launchers(pin_root: Path) -> dict[Path, list[int]]:
    """Launchers of pid infra processes of pods under pin_root, by pin dir: pid -> its `unshare`.

    A daemon killed between starting an infra process and recording it leaves one that no record
    names. Its launcher (`unshare --pid --fork --kill-child ... pyshim-pid-infra <pin dir>/pid-infra.pid`)
    keeps the pin dir in its command line, and killing it kills the infra (--kill-child) and so the
    pod's whole PID namespace. Scanned from /proc; nothing else identifies it after a crash.
    """
    prefix = os.fsencode(str(Path(pin_root))) + b"/"
    found: dict[Path, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pyshim-pid-infra" not in argv or not argv[0].endswith(b"unshare"):
            continue
        pidfile = argv[-1] if argv[-1] else (argv[-2] if len(argv) > 1 else b"")
        if pidfile.startswith(prefix) and pidfile.endswith(os.fsencode(PID_INFRA_PIDFILE)):
            found.setdefault(Path(os.fsdecode(pidfile)).parent, []).append(int(proc.name))
    return found


def kill_pid_infra_launchers(pids: list[int]) -> None:
    """SIGKILL launchers found by pid_infra_launchers and wait until each is gone."""
    for pid in pids:
        _kill_and_wait(pid)


def _check_kinds(kinds: tuple[str, ...]) -> None:
    unknown = [k for k in kinds if k not in PINNABLE_KINDS]
    if unknown or len(set(kinds)) != len(kinds):
        raise InvalidArgument(f"namespace kinds {list(kinds)!r}: want distinct kinds out of {PINNABLE_KINDS}")


def _unpin(pins) -> None:
    errors = []
    for pin in pins:
        try:
            unmount_ns_pin(pin)
        except Internal as exc:
            errors.append(exc.message)
    if errors:
        raise Internal("; ".join(errors))


def _wait_for_pidfile(pidfile: Path, pin_dir: Path) -> int:
    deadline = time.monotonic() + PID_INFRA_START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            text = pidfile.read_text()
        except FileNotFoundError:
            text = ""
        # `echo` writes the line in one go; a complete line means a complete pid.
        if text.endswith("\n"):
            return int(text)
        time.sleep(0.01)
    log = _read_tail(pin_dir / PID_INFRA_LOG)
    raise Internal(
        f"pid infra process for {pin_dir} did not report its pid within "
        f"{PID_INFRA_START_TIMEOUT}s; its stderr: {log or '(empty)'}"
    )


def _wait_for_exec(pid: int, pin_dir: Path) -> None:
    """The shell writes the pid file just before it execs the program: until then the process is
    named `sh` or `env`, and a `pkill sleep`/`pkill sh` in the pod could still take it."""
    deadline = time.monotonic() + PID_INFRA_START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == PID_INFRA_NAME:
                return
        except FileNotFoundError:
            break
        time.sleep(0.005)
    raise Internal(f"pid infra process {pid} for {pin_dir} did not become {PID_INFRA_NAME!r} within "
                   f"{PID_INFRA_START_TIMEOUT}s; its stderr: {_read_tail(pin_dir / PID_INFRA_LOG) or '(empty)'}")


def _check_is_pid_namespace_init(infra: InfraProcess) -> None:
    ns_pids = _status_field(infra.pid, "NSpid").split()
    if len(ns_pids) < 2 or ns_pids[-1] != "1":
        raise Internal(f"pid infra process {infra.pid} is not PID 1 of a new PID namespace (NSpid {ns_pids})")


def _write_record(pin_dir: Path, infra: InfraProcess) -> None:
    record = pin_dir / PID_INFRA_RECORD
    tmp = record.with_suffix(".tmp")
    data = asdict(infra) | {"ns_path": str(infra.ns_path)}
    tmp.write_text(json.dumps(data))
    os.replace(tmp, record)


def _is_same_live_process(infra: InfraProcess) -> bool:
    try:
        stat = _read_stat(infra.pid)
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.start_time == infra.start_time and stat.state not in ("Z", "X")


@dataclass(frozen=True)
class _ProcStat:
    state: str
    start_time: int


def _read_stat(pid: int) -> _ProcStat:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except ProcessLookupError:
        # The process went away between open() and read(): the same as not finding it.
        raise FileNotFoundError(f"/proc/{pid}/stat") from None
    # comm (field 2) may hold spaces and parentheses; the fields after its last ')' don't.
    fields = text[text.rindex(")") + 2 :].split()
    return _ProcStat(state=fields[0], start_time=int(fields[19]))


def _start_time(pid: int) -> int:
    try:
        return _read_stat(pid).start_time
    except FileNotFoundError as exc:
        raise Internal(f"pid infra process {pid} exited right after starting") from exc


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""


def _kill_and_wait(pid: int, start_time: int | None = None) -> None:
    if start_time is not None and not _is_same_live_process(InfraProcess(pid, Path(), start_time)):
        return
    try:
        # PID 1 of a namespace ignores every catchable signal it has no handler for,
        # so only SIGKILL stops it; the kernel then kills the whole namespace.
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + PID_INFRA_STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            # Not our child: it is gone once its parent (unshare) reaped it; a zombie is dead too.
            if _read_stat(pid).state in ("Z", "X"):
                return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise Internal(f"pid infra process {pid} still alive {PID_INFRA_STOP_TIMEOUT}s after SIGKILL")


def _require_binary(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise Internal(f"{name} (util-linux) not found in PATH; pod namespaces need it")
    return path


def _run(command: list[str], what: str, stderr=subprocess.PIPE) -> None:
    try:
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, timeout=COMMAND_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise Internal(f"{what}: {command[0]} timed out after {COMMAND_TIMEOUT}s") from exc
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip() if result.stderr else ""
        raise Internal(f"{what}: {' '.join(command[:2])} exited {result.returncode}: {detail or '(no stderr)'}")


def _read_tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace").strip()
    except OSError:
        return ""
