"""`pyshim exec -it`, `pyshim attach` and `pyshim port-forward`: the CRI streaming calls from a shell.

Each asks the daemon for a URL (Exec, Attach, PortForward) and speaks the protocols kubectl and crictl
speak to it (SPDY/3.1 by default, `--transport websocket` for the v5/v4 channel protocol).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading


def _stdin_pump(session) -> None:
    try:
        while data := os.read(sys.stdin.fileno(), 32 * 1024):
            session.write_stdin(data)
        session.close_stdin()
    except OSError:
        pass


def _interactive(url: str, args, stdin: bool, tty: bool) -> int:
    from pyshim.streaming.client import RemoteCommand, exit_code

    def out(data: bytes, stream=sys.stdout):
        stream.buffer.write(data)
        stream.buffer.flush()

    session = RemoteCommand(url, args.transport, stdin=stdin, stdout=True, stderr=not tty, tty=tty,
                            on_stdout=out, on_stderr=lambda d: out(d, sys.stderr))
    restore = None
    if tty and sys.stdin.isatty():
        import termios
        import tty as tty_mod

        saved = termios.tcgetattr(sys.stdin.fileno())
        restore = lambda: termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)  # noqa: E731
        tty_mod.setraw(sys.stdin.fileno())

        def send_size(*_):
            size = os.get_terminal_size(sys.stdin.fileno())
            session.resize(size.columns, size.lines)

        send_size()
        signal.signal(signal.SIGWINCH, send_size)
    try:
        if stdin:
            threading.Thread(target=_stdin_pump, args=(session,), daemon=True).start()
        status = session.wait(timeout=None)
    finally:
        if restore:
            restore()
    code = exit_code(status)
    if code is None:
        print(f"pyshim {args.command}: {status.get('message', status)}", file=sys.stderr)
        return 1
    return code


def cmd_exec_stream(args) -> int:
    from cri_api import api_pb2 as cri
    from pyshim.client import Client

    tty = bool(args.tty)
    with Client(args.endpoint, timeout=args.timeout) as c:
        url = c.runtime.Exec(cri.ExecRequest(container_id=args.id, cmd=args.cmd, tty=tty, stdin=bool(args.interactive),
                                             stdout=True, stderr=not tty), timeout=c.timeout).url
    return _interactive(url, args, bool(args.interactive), tty)


def cmd_attach(args) -> int:
    from cri_api import api_pb2 as cri
    from pyshim.client import Client

    tty = bool(args.tty)
    with Client(args.endpoint, timeout=args.timeout) as c:
        url = c.runtime.Attach(cri.AttachRequest(container_id=args.id, stdin=args.stdin, tty=tty, stdout=True,
                                                 stderr=not tty), timeout=c.timeout).url
    return _interactive(url, args, args.stdin, tty)


def _parse_mapping(text: str) -> tuple[int, int]:
    local, sep, remote = text.partition(":")
    if not sep:
        local = remote = text
    try:
        return int(local or remote), int(remote)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want LOCAL:REMOTE or PORT") from None


def cmd_port_forward(args) -> int:
    from cri_api import api_pb2 as cri
    from pyshim.client import Client
    from pyshim.streaming.client import PortForwardSession, relay

    mappings = [_parse_mapping(m) for m in args.ports]
    with Client(args.endpoint, timeout=args.timeout) as c:
        url = c.runtime.PortForward(cri.PortForwardRequest(pod_sandbox_id=args.pod_id,
                                                           port=[r for _, r in mappings]), timeout=c.timeout).url
    session = PortForwardSession(url)
    listeners = []
    for local, remote in mappings:
        listener = socket.create_server((args.address, local))
        listeners.append(listener)
        print(f"Forwarding from {args.address}:{listener.getsockname()[1]} -> {remote}", flush=True)

        def serve(listener=listener, remote=remote):
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return

                def handle(conn=conn):
                    try:
                        forwarded = session.connect(remote)
                    except OSError as e:
                        print(f"port-forward to {remote}: {e}", file=sys.stderr)
                        conn.close()
                        return

                    def report():
                        message = forwarded.error()
                        if message:
                            print(f"port-forward to {remote}: {message}", file=sys.stderr)

                    threading.Thread(target=report, daemon=True).start()
                    relay(conn, forwarded)
                    conn.close()

                threading.Thread(target=handle, daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
    try:
        session.session.closed.wait()
        print("pyshim port-forward: the streaming connection ended", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for listener in listeners:
            listener.close()
        session.close()


def register(sub, client_command, exec_parser) -> None:
    """Add the streaming commands to the `pyshim` parser; `exec -i/-t` switches exec to streaming."""
    exec_parser.add_argument("-i", "--interactive", action="store_true", help="pass stdin (streaming Exec)")
    exec_parser.add_argument("-t", "--tty", action="store_true", help="allocate a terminal (streaming Exec)")
    exec_parser.add_argument("--transport", choices=("spdy", "websocket"), default="spdy")
    exec_sync = exec_parser.get_default("func")
    exec_parser.set_defaults(func=lambda args: cmd_exec_stream(args) if args.interactive or args.tty
                             else exec_sync(args))

    p = client_command("attach", cmd_attach, "attach to a running container's stdio (streaming Attach)")
    p.add_argument("id")
    p.add_argument("-i", "--stdin", action="store_true", help="pass stdin (the container needs stdin: true)")
    p.add_argument("-t", "--tty", action="store_true", help="the container has a terminal")
    p.add_argument("--transport", choices=("spdy", "websocket"), default="spdy")

    p = client_command("port-forward", cmd_port_forward, "forward local ports into a pod (streaming PortForward)")
    p.add_argument("pod_id")
    p.add_argument("ports", nargs="+", metavar="LOCAL:REMOTE")
    p.add_argument("--address", default="127.0.0.1", help="local address to listen on")
