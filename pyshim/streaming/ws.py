"""WebSocket channels (Kubernetes' wsstream) on top of wsproto's framing.

Each binary message carries one channel's data: the first byte is the channel number. With
`v5.channel.k8s.io` a message [255, N] closes channel N for writing (kubectl's stdin EOF). Text
messages are taken as their UTF-8 bytes (the Python kubernetes client sends str data as text).
The base64 channel protocols are not served.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
import threading

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import generate_accept_token

log = logging.getLogger(__name__)

CLOSE_CHANNEL = 255
V5_PROTOCOL = "v5.channel.k8s.io"


def accept_token(key: str) -> str:
    return generate_accept_token(key.encode()).decode()


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def check_accept(key: str, accept: str) -> bool:
    expected = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    return accept.encode() == expected


class ChannelConnection:
    """A WebSocket whose messages are channel-tagged. run() is the reader loop (a thread of its own);
    `on_data(channel, data)` and `on_close_channel(channel)` are called from it."""

    def __init__(self, sock: socket.socket, client: bool, protocol: str = "", initial: bytes = b"",
                 on_data=None, on_close_channel=None):
        self.sock = sock
        self.protocol = protocol
        self.client = client
        self._ws = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
        self._initial = initial
        self._lock = threading.Lock()
        self.on_data = on_data or (lambda channel, data: None)
        self.on_close_channel = on_close_channel or (lambda channel: None)
        self.closed = threading.Event()

    @property
    def v5(self) -> bool:
        return self.protocol == V5_PROTOCOL

    def _write(self, event) -> None:
        with self._lock:
            if self.closed.is_set() or self._ws.state != ConnectionState.OPEN:
                raise OSError("websocket is closed")
            data = self._ws.send(event)
            try:
                self.sock.sendall(data)
            except OSError:
                self._finish()
                raise

    def send(self, channel: int, data: bytes) -> None:
        self._write(BytesMessage(data=bytes([channel]) + bytes(data)))

    def close_channel(self, channel: int) -> None:
        """v5 only: tell the peer that nothing more comes on `channel`."""
        if self.v5:
            self.send(CLOSE_CHANNEL, bytes([channel]))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (the reader loop ends when the peer answers or disconnects)."""
        try:
            self._write(CloseConnection(code=code, reason=reason or None))
        except OSError:
            pass

    def abort(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self) -> None:
        pending: list[bytes] = []
        data = self._initial
        try:
            while True:
                if data:
                    self._ws.receive_data(data)
                    for event in self._ws.events():
                        if isinstance(event, (BytesMessage, TextMessage)):
                            chunk = event.data.encode() if isinstance(event, TextMessage) else event.data
                            pending.append(chunk)
                            if event.message_finished:
                                self._deliver(b"".join(pending))
                                pending = []
                        elif isinstance(event, Ping):
                            with self._lock:
                                if self._ws.state == ConnectionState.OPEN:
                                    self.sock.sendall(self._ws.send(event.response()))
                        elif isinstance(event, CloseConnection):
                            with self._lock:
                                if self._ws.state == ConnectionState.REMOTE_CLOSING:
                                    try:
                                        self.sock.sendall(self._ws.send(event.response()))
                                    except OSError:
                                        pass
                            return
                data = self.sock.recv(256 * 1024)
                if not data:
                    return
        except OSError:
            return
        except Exception as e:  # noqa: BLE001 - a protocol error ends this connection only
            log.info("websocket protocol error", extra={"error": str(e)})
        finally:
            self._finish()  # the owner closes the socket once its writers are done

    def _deliver(self, message: bytes) -> None:
        if not message:
            return
        channel, payload = message[0], message[1:]
        if channel == CLOSE_CHANNEL and self.v5:
            if payload:
                self.on_close_channel(payload[0])
            return
        self.on_data(channel, payload)
