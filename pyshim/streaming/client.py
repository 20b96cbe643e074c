"""Client side of the streaming protocols: what kubectl and crictl do with an Exec, Attach or
PortForward URL, for `pyshim exec -it`, `pyshim attach`, `pyshim port-forward`, tests and benchmarks.

Transports: SPDY/3.1 (as kubelet's clients) or WebSocket (v5/v4 channels).
"""
from __future__ import annotations

import json
import socket
import threading
from urllib.parse import urlsplit

import h11

from pyshim.streaming import portforward, remotecommand, spdy, ws


class UpgradeFailed(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body.strip()}")
        self.status = status
        self.body = body


def _connect(url: str) -> tuple[socket.socket, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "ws"):
        raise ValueError(f"only plain http:// streaming URLs are supported, not {url}")
    host = parts.hostname or "127.0.0.1"
    sock = socket.create_connection((host, parts.port or 80), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return sock, target


def upgrade(url: str, transport: str, protocols: list[str], method: str | None = None
            ) -> tuple[socket.socket, str, bytes]:
    """Send the upgrade request; returns the socket, the protocol the server chose, and any bytes it
    sent after its 101 response. UpgradeFailed for any other answer (404 for a bad token)."""
    sock, target = _connect(url)
    host = urlsplit(url).netloc
    conn = h11.Connection(h11.CLIENT)
    if transport == "websocket":
        key = ws.new_key()
        headers = [("Host", host), ("Connection", "Upgrade"), ("Upgrade", "websocket"),
                   ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", key)]
        if protocols:
            headers.append(("Sec-WebSocket-Protocol", ", ".join(protocols)))
        request = h11.Request(method=method or "GET", target=target, headers=headers)
    elif transport == "spdy":
        key = ""
        headers = [("Host", host), ("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("Content-Length", "0")]
        headers += [("X-Stream-Protocol-Version", p) for p in protocols]
        request = h11.Request(method=method or "POST", target=target, headers=headers)
    else:
        raise ValueError(f"unknown transport {transport!r}: spdy or websocket")
    try:
        sock.sendall(conn.send(request))
        if transport == "spdy":
            sock.sendall(conn.send(h11.EndOfMessage()))
        status, response_headers, body = None, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                if not data and status is None:
                    raise UpgradeFailed(0, "connection closed before a response")
                continue
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                response_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                break
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                raise UpgradeFailed(status or 0, body.decode(errors="replace"))
    except BaseException:
        sock.close()
        raise
    if transport == "websocket":
        if not ws.check_accept(key, response_headers.get("sec-websocket-accept", "")):
            sock.close()
            raise UpgradeFailed(101, "bad Sec-WebSocket-Accept")
        chosen = response_headers.get("sec-websocket-protocol", "")
    else:
        chosen = response_headers.get("x-stream-protocol-version", "")
    sock.settimeout(None)
    return sock, chosen, conn.trailing_data[0]


class _Sink:
    """Collects a stream's output (and passes it to a callback, if given)."""

    def __init__(self, callback=None):
        self.data = bytearray()
        self.callback = callback
        self.cond = threading.Condition()

    def add(self, chunk: bytes) -> None:
        with self.cond:
            if self.callback is None:
                self.data += chunk
            self.cond.notify_all()
        if self.callback is not None:
            self.callback(chunk)

    def wait_for(self, needle: bytes, timeout: float = 10) -> bytes:
        with self.cond:
            if not self.cond.wait_for(lambda: needle in self.data, timeout):
                raise TimeoutError(f"{needle!r} did not arrive; got {bytes(self.data)!r}")
            return bytes(self.data)


class RemoteCommand:
    """An exec or attach session. Output goes to `on_stdout`/`on_stderr` callbacks, or is collected in
    .stdout / .stderr. wait() returns the Status the server sent (see exit_code)."""

    def __init__(self, url: str, transport: str = "spdy", stdin: bool = False, stdout: bool = True,
                 stderr: bool = True, tty: bool = False, protocols: list[str] | None = None,
                 on_stdout=None, on_stderr=None):
        self.transport = transport
        self.tty = tty
        self._out = _Sink(on_stdout)
        self._err = _Sink(on_stderr)
        self._error = bytearray()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        default = remotecommand.SPDY_PROTOCOLS if transport == "spdy" else [remotecommand.V5, remotecommand.V4]
        self.sock, self.protocol, initial = upgrade(url, transport, protocols or default)
        if transport == "spdy":
            self._start_spdy(initial, stdin, stdout, stderr and not tty, tty)
        else:
            self._start_ws(initial)

    # -- SPDY
    def _start_spdy(self, initial: bytes, stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
        self.session = spdy.Session(self.sock, server=False, initial=initial)
        self._reader = self._spawn(self.session.run)
        kinds = ["error"] + [k for k, on in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr),
                                             ("resize", tty and self.protocol in (remotecommand.V3, remotecommand.V4)))
                             if on]
        # All SYN_STREAMs at once, then the replies: one round trip instead of one per stream.
        self.streams = {k: self.session.open_stream({"streamType": k}, wait=None) for k in kinds}
        for s in self.streams.values():
            s.wait_reply(30)
        self._spawn(self._drain, self.streams["error"], self._error.extend)
        pumps = [self._spawn(self._drain, self.streams[k], sink.add)
                 for k, sink in (("stdout", self._out), ("stderr", self._err)) if k in self.streams]

        def finished():
            for p in pumps:
                p.join()
            self._threads[1].join()  # the error stream
            self._done.set()

        self._spawn(finished)

    @staticmethod
    def _drain(stream: spdy.Stream, sink) -> None:
        while chunk := stream.read():
            sink(chunk)

    # -- WebSocket
    def _start_ws(self, initial: bytes) -> None:
        def on_data(channel: int, data: bytes):
            if channel == remotecommand.STDOUT:
                self._out.add(data)
            elif channel == remotecommand.STDERR:
                self._err.add(data)
            elif channel == remotecommand.ERROR:
                self._error.extend(data)

        self.channels = ws.ChannelConnection(self.sock, client=True, protocol=self.protocol, initial=initial,
                                             on_data=on_data)

        def run():
            self.channels.run()
            self._done.set()

        self._spawn(run)

    def _spawn(self, target, *args) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    # -- the session
    @property
    def stdout(self) -> bytes:
        return bytes(self._out.data)

    @property
    def stderr(self) -> bytes:
        return bytes(self._err.data)

    def wait_stdout(self, needle: bytes, timeout: float = 10) -> bytes:
        return self._out.wait_for(needle, timeout)

    def write_stdin(self, data: bytes) -> None:
        if self.transport == "spdy":
            self.streams["stdin"].write(data)
        else:
            self.channels.send(remotecommand.STDIN, data)

    def close_stdin(self) -> None:
        if self.transport == "spdy":
            self.streams["stdin"].close()
        else:
            self.channels.close_channel(remotecommand.STDIN)

    def resize(self, width: int, height: int) -> None:
        doc = json.dumps({"Width": width, "Height": height}).encode()
        if self.transport == "spdy":
            if "resize" in self.streams:
                self.streams["resize"].write(doc)
        else:
            self.channels.send(remotecommand.RESIZE, doc)

    def wait(self, timeout: float | None = 60) -> dict:
        if not self._done.wait(timeout):
            raise TimeoutError("the remote command did not finish")
        self.close()
        text = bytes(self._error).strip()
        if not text:
            return remotecommand.status_success()
        try:
            return json.loads(text)
        except ValueError:  # v1-v3: the failure's message
            return {"status": "Failure", "message": text.decode(errors="replace")}

    def close(self) -> None:
        if self.transport == "spdy":
            self.session.close()
        else:
            self.channels.close()
            self.channels.abort()
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """Drop the connection without a word, as a killed client would."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def exit_code(status: dict) -> int | None:
    return remotecommand.exit_code_of(status)


# ---- port-forward ------------------------------------------------------------------------------

class ForwardedStream:
    """One forwarded TCP connection over a SPDY port-forward session: send()/recv() like a socket."""

    def __init__(self, data: spdy.Stream, error: spdy.Stream):
        self.data = data
        self.error_stream = error
        self._error = bytearray()
        self._error_done = threading.Event()
        threading.Thread(target=self._read_error, daemon=True).start()

    def _read_error(self) -> None:
        while chunk := self.error_stream.read():
            self._error += chunk
        self._error_done.set()

    def sendall(self, data: bytes) -> None:
        self.data.write(data)

    def recv(self, timeout: float | None = None) -> bytes:
        return self.data.read(timeout)

    def shutdown_write(self) -> None:
        self.data.close()

    def error(self, timeout: float | None = None) -> str:
        """The error the server reported for this connection ("" if none, once the streams ended)."""
        self._error_done.wait(timeout)
        return self._error.decode(errors="replace")

    def close(self) -> None:
        self.data.close()
        self.data.session.forget(self.data)
        self.error_stream.session.forget(self.error_stream)


class PortForwardSession:
    """A SPDY port-forward session: any number of connections to any ports of the pod."""

    def __init__(self, url: str):
        self.sock, self.protocol, initial = upgrade(url, "spdy", [portforward.PROTOCOL])
        self.session = spdy.Session(self.sock, server=False, initial=initial)
        self._reader = threading.Thread(target=self.session.run, daemon=True)
        self._reader.start()
        self._next_request = 0
        self._lock = threading.Lock()

    def connect(self, port: int) -> ForwardedStream:
        with self._lock:
            request_id = str(self._next_request)
            self._next_request += 1
        headers = {"streamType": "error", "port": str(port), "requestID": request_id}
        error = self.session.open_stream(headers, wait=None)
        data = self.session.open_stream(dict(headers, streamType="data"), wait=None)
        error.wait_reply(30)
        data.wait_reply(30)
        error.close()  # kubectl: the client never writes on the error stream
        return ForwardedStream(data, error)

    def close(self) -> None:
        self.session.close()
        self._reader.join(5)
        self.sock.close()


def relay(local: socket.socket, remote: ForwardedStream) -> None:
    """Copy between a local socket and a forwarded connection until both directions end."""
    def down():
        try:
            while chunk := remote.recv():
                local.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                local.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    t = threading.Thread(target=down, daemon=True)
    t.start()
    try:
        while chunk := local.recv(256 * 1024):
            remote.sendall(chunk)
    except OSError:
        pass
    finally:
        remote.shutdown_write()
    t.join()
