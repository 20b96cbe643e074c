"""The streaming HTTP server: /exec/TOKEN, /attach/TOKEN and /portforward/TOKEN, as kubelet's.

h11 parses the request line and headers; the connection is then upgraded to SPDY/3.1
(`Upgrade: SPDY/3.1`, kubectl and crictl) or WebSocket (`Upgrade: websocket`). A token is consumed
by the first request that names it; an unknown, used or expired token gets 404 and nothing runs.
One thread per connection.
"""
from __future__ import annotations

import logging
import socket
import threading
import traceback
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import h11

from pyshim.streaming import portforward, remotecommand, ws
from pyshim.streaming.tokens import TokenCache

log = logging.getLogger("pyshim.streaming")

MAX_REQUEST_HEAD = 64 * 1024


@dataclass(frozen=True)
class ExecRequest:
    container_id: str
    cmd: list[str]
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass(frozen=True)
class AttachRequest:
    container_id: str
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass(frozen=True)
class PortForwardRequest:
    sandbox_id: str
    ports: list[int] = field(default_factory=list)


class Backend(Protocol):
    def exec(self, request: ExecRequest, streams: remotecommand.Streams) -> int:
        """Run the command; returns its exit code. Raises to report an internal error."""

    def attach(self, request: AttachRequest, streams: remotecommand.Streams) -> None:
        """Copy the container's stdio until it exits or the client leaves."""

    def connect_port(self, request: PortForwardRequest, port: int) -> socket.socket:
        """A TCP connection to 127.0.0.1:port inside the pod; OSError when refused."""


_KINDS = {"exec": ExecRequest, "attach": AttachRequest, "portforward": PortForwardRequest}


class StreamingServer:
    def __init__(self, backend: Backend, address: str = "127.0.0.1", port: int = 0, token_ttl: float = 60.0,
                 stream_creation_timeout: float = 30.0):
        self.backend = backend
        self.tokens = TokenCache(token_ttl)
        self.stream_creation_timeout = stream_creation_timeout
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((address, port))
        self._listener.listen(128)
        self.address = address
        self.port = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    def url_for(self, request) -> str:
        kind = next(k for k, t in _KINDS.items() if isinstance(request, t))
        return f"{self.base_url}/{kind}/{self.tokens.insert(request)}"

    def start(self) -> "StreamingServer":
        self._thread = threading.Thread(target=self._accept_loop, name="streaming-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stopped.is_set():
                    return
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve_connection, args=(conn,), name="streaming-conn",
                             daemon=True).start()

    # ---- one connection
    def _serve_connection(self, sock: socket.socket) -> None:
        try:
            self._handle(sock)
        except Exception:  # noqa: BLE001 - one connection's failure must not reach the others
            log.error("streaming connection failed", extra={"error": traceback.format_exc()})
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _handle(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        sock.settimeout(self.stream_creation_timeout)
        request = None
        while request is None:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.SEND_BODY:
                    return
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.ConnectionClosed):
                return
        sock.settimeout(None)
        headers = _headers(request.headers)
        url = urlsplit(request.target.decode("latin-1"))
        parts = url.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] not in _KINDS:
            return _respond(sock, conn, 404, "not found")
        kind, token = parts
        cached = self.tokens.consume(token)
        if cached is None or not isinstance(cached, _KINDS[kind]):
            log.info("streaming request with an unknown, used or expired token", extra={"kind": kind})
            return _respond(sock, conn, 404, "not found")
        upgrade = ",".join(headers.get("upgrade", [])).lower()
        if "websocket" in upgrade:
            self._websocket(sock, conn, request, headers, kind, cached, parse_qs(url.query))
        elif "spdy/3.1" in upgrade:
            self._spdy(sock, conn, headers, kind, cached)
        else:
            _respond(sock, conn, 400, "unable to upgrade: missing upgrade headers in request")

    def _spdy(self, sock, conn, headers, kind: str, cached) -> None:
        offered = _comma_values(headers.get("x-stream-protocol-version", []))
        supported = [portforward.PROTOCOL] if kind == "portforward" else remotecommand.SPDY_PROTOCOLS
        if not offered:
            return _respond(sock, conn, 400, "unable to upgrade: X-Stream-Protocol-Version is required")
        protocol = next((p for p in offered if p in supported), None)
        if protocol is None:
            return _respond(sock, conn, 403, f"unable to upgrade: unable to negotiate protocol: client supports "
                            f"{offered}, server accepts {supported}",
                            [("X-Accepted-Stream-Protocol-Versions", p) for p in supported])
        sock.sendall(conn.send(h11.InformationalResponse(status_code=101, headers=[
            ("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", protocol)])))
        initial = conn.trailing_data[0]
        if kind == "portforward":
            portforward.serve_spdy(sock, initial, lambda port: self.backend.connect_port(cached, port),
                                   cached.sandbox_id)
            return
        opts = remotecommand.Options(cached.stdin, cached.stdout, cached.stderr, cached.tty)
        streams = remotecommand.spdy_streams(sock, initial, protocol, opts, self.stream_creation_timeout)
        self._run_remotecommand(kind, cached, streams)

    def _websocket(self, sock, conn, request, headers, kind: str, cached, query) -> None:
        key = (headers.get("sec-websocket-key") or [""])[0]
        if not key:
            return _respond(sock, conn, 400, "missing Sec-WebSocket-Key")
        offered = _comma_values(headers.get("sec-websocket-protocol", []))
        supported = portforward.WEBSOCKET_PROTOCOLS if kind == "portforward" else remotecommand.WEBSOCKET_PROTOCOLS
        if offered:
            protocol = next((p for p in offered if p in supported), None)
            if protocol is None:
                return _respond(sock, conn, 400, f"requested protocol(s) {offered} are not supported: {supported}")
        else:
            protocol = ""
        response = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Accept", ws.accept_token(key))]
        if protocol:
            response.append(("Sec-WebSocket-Protocol", protocol))
        sock.sendall(conn.send(h11.InformationalResponse(status_code=101, headers=response)))
        initial = conn.trailing_data[0]
        if kind == "portforward":
            ports = list(cached.ports) or [int(p) for p in query.get("port", []) if p.isdigit()]
            portforward.serve_websocket(sock, initial, protocol, ports,
                                        lambda port: self.backend.connect_port(cached, port), cached.sandbox_id)
            return
        opts = remotecommand.Options(cached.stdin, cached.stdout, cached.stderr, cached.tty)
        streams = remotecommand.websocket_streams(sock, initial, protocol or remotecommand.V1, opts)
        self._run_remotecommand(kind, cached, streams)

    def _run_remotecommand(self, kind: str, cached, streams: remotecommand.Streams) -> None:
        try:
            if kind == "exec":
                code = self.backend.exec(cached, streams)
                status = remotecommand.status_success() if code == 0 else \
                    remotecommand.status_exit_code(code, list(cached.cmd))
            else:
                self.backend.attach(cached, streams)
                status = remotecommand.status_success()
        except Exception as e:  # noqa: BLE001 - reported to the client as an internal error Status
            message = getattr(e, "message", None) or str(e) or type(e).__name__
            what = "executing command in container" if kind == "exec" else "attaching to container"
            log.info("streaming %s failed", kind, extra={"container": cached.container_id, "error": message})
            status = remotecommand.status_internal_error(f"error {what}: {message}")
        if not streams.disconnected.is_set():
            streams.write_status(status)
        streams.finish()


def _headers(raw) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in raw:
        out.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return out


def _comma_values(values: list[str]) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def _respond(sock, conn: h11.Connection, status: int, text: str, extra_headers=()) -> None:
    body = (text + "\n").encode()
    try:
        sock.sendall(conn.send(h11.Response(status_code=status, headers=[
            ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
            ("Connection", "close"), *extra_headers])))
        sock.sendall(conn.send(h11.Data(data=body)))
        sock.sendall(conn.send(h11.EndOfMessage()))
    except (OSError, h11.LocalProtocolError):
        pass
