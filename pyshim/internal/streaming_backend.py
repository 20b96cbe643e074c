"""What the streaming calls do to containers and pods: the backend of pyshim.streaming's server.

- exec: `runc exec` (through the runc adapter) with pipes, or with a terminal whose size follows the
  client's resize events; a client that goes away mid-stream gets its process killed.
- attach: conmon's attach socket (output as packets tagged 2 stdout / 3 stderr, input as plain bytes) and its
  control fifo for terminal sizes; the attach ends when the container exits or the client leaves.
- port-forward: a TCP connection to 127.0.0.1:PORT made inside the pod's network namespace.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
from pathlib import Path

from pyshim.errors import FailedPrecondition
from pyshim.internal import netns
from pyshim.internal.conmon import Conmon, MonitorPaths
from pyshim.internal.runc import ExecProcess, Runc
from pyshim.internal.state import ContainerState
from pyshim.streaming.remotecommand import Streams
from pyshim.streaming.server import AttachRequest, ExecRequest, PortForwardRequest

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
# How long output may keep flowing after the process exited (a background child holding the pipe).
DRAIN_SECONDS = 2.0


def _thread(target, *args, name: str) -> threading.Thread:
    t = threading.Thread(target=target, args=args, name=name, daemon=True)
    t.start()
    return t


def _copy_fd_to(fd: int, out, terminal: bool = False) -> None:
    """Copy an fd to a client stream until EOF (EIO for a terminal whose other end closed)."""
    broken = out is None
    try:
        while True:
            try:
                data = os.read(fd, CHUNK)
            except OSError as e:
                if terminal and e.errno == errno.EIO:
                    break
                raise
            if not data:
                break
            if not broken:
                try:
                    out.write(data)
                except OSError:
                    broken = True  # keep draining, so the process never blocks on a full pipe
    except OSError:
        pass
    finally:
        if out is not None:
            with contextlib.suppress(OSError):
                out.close()


def _copy_stdin(source, fd: int, close_at_end: bool) -> None:
    try:
        while data := source.read():
            os.write(fd, data)
    except OSError:
        pass
    finally:
        if close_at_end:
            with contextlib.suppress(OSError):
                os.close(fd)


class StreamingBackend:
    def __init__(self, containers, sandboxes, runc: Runc):
        self._containers = containers
        self._sandboxes = sandboxes
        self._runc = runc

    def _running(self, container_id: str):
        record = self._containers.get(container_id)
        if record.state != ContainerState.RUNNING:
            raise FailedPrecondition(f"container {record.id} is {record.state.value}, not running")
        return record

    # ---- exec
    def exec(self, request: ExecRequest, streams: Streams) -> int:
        record = self._running(request.container_id)
        spec_process = self._containers.spec_of(record)["process"]
        process = dict(spec_process, args=list(request.cmd), terminal=bool(request.tty))
        if request.tty and not any(e.startswith("TERM=") for e in process.get("env", [])):
            process["env"] = list(process.get("env", [])) + ["TERM=xterm"]
        proc = self._runc.exec_start(record.id, process, stdin=request.stdin)
        try:
            return self._run_exec(proc, request, streams)
        finally:
            proc.close()

    def _run_exec(self, proc: ExecProcess, request: ExecRequest, streams: Streams) -> int:
        done = threading.Event()
        pumps = []
        if proc.terminal_fd is not None:
            pumps.append(_thread(_copy_fd_to, proc.terminal_fd, streams.stdout, True, name="exec-tty-out"))
            if streams.stdin is not None:
                _thread(_copy_stdin, streams.stdin, proc.terminal_fd, False, name="exec-tty-in")
            if streams.resize is not None:
                _thread(self._follow_resizes, streams, proc.resize, name="exec-resize")
        else:
            pumps.append(_thread(_copy_fd_to, proc.stdout_fd, streams.stdout, name="exec-stdout"))
            pumps.append(_thread(_copy_fd_to, proc.stderr_fd, streams.stderr, name="exec-stderr"))
            proc.stdout_fd = proc.stderr_fd = None  # the pumps close them
            if proc.stdin_fd is not None and streams.stdin is not None:
                _thread(_copy_stdin, streams.stdin, proc.stdin_fd, True, name="exec-stdin")
                proc.stdin_fd = None

        def kill_if_client_leaves():
            while not done.is_set():
                if streams.disconnected.wait(0.2):
                    if not done.is_set():
                        log.info("exec client went away; killing the exec'd process",
                                 extra={"container": request.container_id})
                        proc.kill()
                    return

        _thread(kill_if_client_leaves, name="exec-watch")
        try:
            code = proc.wait()
        finally:
            done.set()
        for pump in pumps:
            pump.join(DRAIN_SECONDS)
        return code

    @staticmethod
    def _follow_resizes(streams: Streams, apply) -> None:
        while (size := streams.resize.next()) is not None:
            try:
                apply(*size)
            except OSError:
                return

    # ---- attach
    def attach(self, request: AttachRequest, streams: Streams) -> None:
        record = self._running(request.container_id)
        config = self._containers.config_of(record)
        paths = MonitorPaths(bundle=record.bundle, exit_dir=Path(), persist_dir=Path(), attach_dir=Path())
        sock = self._connect_attach(paths.attach_socket)
        try:
            if streams.stdin is not None and config.stdin:
                _thread(self._attach_stdin, streams.stdin, sock, config.stdin_once, name="attach-stdin")
            if streams.resize is not None and config.tty:
                _thread(self._follow_resizes, streams,
                        lambda w, h: Conmon.resize_terminal(paths, w, h), name="attach-resize")

            def hang_up_when_client_leaves():
                streams.disconnected.wait()
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

            _thread(hang_up_when_client_leaves, name="attach-watch")
            self._attach_output(sock, streams)
        finally:
            sock.close()

    @staticmethod
    def _connect_attach(path: Path) -> socket.socket:
        # The socket path can be longer than sun_path allows: connect through /proc/self/fd.
        dir_fd = os.open(path.parent, os.O_PATH | os.O_CLOEXEC)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(f"/proc/self/fd/{dir_fd}/{path.name}")
        except OSError as e:
            sock.close()
            raise FailedPrecondition(f"cannot attach: conmon's attach socket {path}: {e.strerror}") from None
        finally:
            os.close(dir_fd)
        return sock

    @staticmethod
    def _attach_stdin(source, sock: socket.socket, stdin_once: bool) -> None:
        try:
            while data := source.read():
                sock.sendall(data)
            if stdin_once:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    @staticmethod
    def _attach_output(sock: socket.socket, streams: Streams) -> None:
        # conmon tags each packet with its pipe: 2 stdout, 3 stderr (CRI-O's AttachPipeStdout/Stderr).
        outs = {2: streams.stdout, 3: streams.stderr}
        broken: set[int] = set()
        try:
            while True:
                packet = sock.recv(CHUNK + 1)
                if not packet:
                    break
                pipe, data = packet[0], packet[1:]
                out = outs.get(pipe)
                if out is None or pipe in broken or not data:
                    continue
                try:
                    out.write(data)
                except OSError:
                    broken.add(pipe)
        except OSError:
            pass
        for out in (streams.stdout, streams.stderr):
            if out is not None:
                with contextlib.suppress(OSError):
                    out.close()

    # ---- port-forward
    def connect_port(self, request: PortForwardRequest, port: int) -> socket.socket:
        record = self._sandboxes.get(request.sandbox_id)
        path = netns.netns_path(record.netns_name) if record.netns_name else None
        if path is not None and not path.exists():
            raise OSError(errno.ENOENT, f"the pod's network namespace {path} is gone")
        sock = netns.connect_in_netns(path, "127.0.0.1", port)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
