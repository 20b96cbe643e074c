"""The Kubernetes remotecommand protocol (exec and attach), server side, over SPDY or WebSocket.

SPDY (`X-Stream-Protocol-Version: v4.channel.k8s.io`, v3, v2, channel.k8s.io): the client opens one
stream per standard stream, named by its `streamType` header (error, stdin, stdout, stderr, resize).
WebSocket (`Sec-WebSocket-Protocol: v5.channel.k8s.io`, v4 ...): channels 0 stdin, 1 stdout, 2 stderr,
3 error, 4 resize; v5 adds channel 255 to close one (stdin EOF).

The end: v4 and later write a metav1.Status as JSON on the error stream - Success, or Failure with
reason NonZeroExitCode and one cause of type ExitCode whose message is the exit code; older versions
write only a failure's message.
"""
from __future__ import annotations

import json
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

from pyshim.streaming import spdy, ws

V1 = "channel.k8s.io"
V2 = "v2.channel.k8s.io"
V3 = "v3.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"
# What kubelet's streaming server offers, in its order of preference.
SPDY_PROTOCOLS = [V4, V3, V2, V1]
WEBSOCKET_PROTOCOLS = [V5, V4, V3, V2, V1]

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
STREAM_TYPES = {"stdin": STDIN, "stdout": STDOUT, "stderr": STDERR, "error": ERROR, "resize": RESIZE}

NON_ZERO_EXIT_CODE_REASON = "NonZeroExitCode"
EXIT_CODE_CAUSE_TYPE = "ExitCode"


# ---- Status objects ----------------------------------------------------------------------------

def status_success() -> dict:
    return {"metadata": {}, "status": "Success"}


def status_exit_code(code: int, command: list[str] | None = None) -> dict:
    """What kubelet writes for an exec that exited non-zero (a metav1.Status; StatusCause.Type is
    serialised as "reason")."""
    what = f"error executing command {command}, exit code {code}" if command else f"exit code {code}"
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: {what}",
            "reason": NON_ZERO_EXIT_CODE_REASON,
            "details": {"causes": [{"reason": EXIT_CODE_CAUSE_TYPE, "message": str(code)}]}}


def status_internal_error(message: str) -> dict:
    return {"metadata": {}, "status": "Failure", "message": f"Internal error occurred: {message}",
            "reason": "InternalError", "details": {"causes": [{"message": message}]}, "code": 500}


def exit_code_of(status: dict) -> int | None:
    """The client's reading of a Status: 0 for Success, the ExitCode cause for NonZeroExitCode, None
    for any other failure (the caller reports its message)."""
    if status.get("status") == "Success":
        return 0
    if status.get("reason") == NON_ZERO_EXIT_CODE_REASON:
        for cause in status.get("details", {}).get("causes", []):
            if cause.get("reason") == EXIT_CODE_CAUSE_TYPE:
                return int(cause.get("message", "1"))
    return None


def encode_status(status: dict, protocol: str) -> bytes:
    if protocol in (V4, V5):
        return json.dumps(status, separators=(",", ":")).encode()
    return b"" if status.get("status") == "Success" else status.get("message", "error").encode()


# ---- stream ends as the backend sees them -------------------------------------------------------

class InputStream:
    """What the client sends on one stream; read() returns b"" at its end."""

    def __init__(self):
        self._q: queue.SimpleQueue = queue.SimpleQueue()

    def feed(self, data: bytes) -> None:
        if data:
            self._q.put(data)

    def end(self) -> None:
        self._q.put(b"")

    def read(self, timeout: float | None = None) -> bytes:
        try:
            data = self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no data") from None
        if not data:
            self._q.put(b"")  # stay at EOF for later readers
        return data


class ResizeEvents:
    """Terminal sizes from a resize stream: JSON objects {"Width": W, "Height": H}, back to back."""

    def __init__(self, source):
        self._source = source
        self._buf = ""
        self._decoder = json.JSONDecoder()

    def next(self) -> tuple[int, int] | None:
        """The next (width, height); None when the stream ends."""
        while True:
            text = self._buf.lstrip()
            if text:
                try:
                    obj, end = self._decoder.raw_decode(text)
                except ValueError:
                    obj = None
                else:
                    self._buf = text[end:]
                    if isinstance(obj, dict):
                        return int(obj.get("Width", 0)), int(obj.get("Height", 0))
                    continue
            chunk = self._source.read()
            if not chunk:
                return None
            self._buf += chunk.decode(errors="replace")


@dataclass
class Streams:
    """The client's side of an exec or attach, as the backend uses it."""
    protocol: str
    tty: bool
    stdin: object = None    # .read() -> bytes, b"" at EOF
    stdout: object = None   # .write(bytes), .close()
    stderr: object = None
    resize: ResizeEvents | None = None
    disconnected: threading.Event = field(default_factory=threading.Event)
    _status_writer: object = None
    _finish: object = None

    def write_status(self, status: dict) -> None:
        try:
            self._status_writer(encode_status(status, self.protocol))
        except OSError:
            pass

    def finish(self) -> None:
        """Close the connection gracefully once the status is written."""
        if self._finish:
            self._finish()


@dataclass(frozen=True)
class Options:
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool

    def expected(self, protocol: str) -> set[str]:
        wanted = {"error"}
        if self.stdin:
            wanted.add("stdin")
        if self.stdout:
            wanted.add("stdout")
        if self.stderr and not self.tty:
            wanted.add("stderr")
        if self.tty and protocol in (V3, V4, V5):
            wanted.add("resize")
        return wanted


def _wait_peer_close(thread: threading.Thread, timeout: float) -> None:
    thread.join(timeout)


# ---- SPDY ---------------------------------------------------------------------------------------

def spdy_streams(sock: socket.socket, initial: bytes, protocol: str, opts: Options,
                 creation_timeout: float = 30.0) -> Streams:
    """Serve the SPDY session and wait until the client opened the streams `opts` asks for."""
    wanted = opts.expected(protocol)
    got: dict[str, spdy.Stream] = {}
    ready = threading.Event()
    lock = threading.Lock()

    def on_stream(stream: spdy.Stream):
        kind = stream.header("streamtype")
        if kind not in STREAM_TYPES:
            return False
        with lock:
            got.setdefault(kind, stream)
            if wanted <= set(got):
                ready.set()
        return True

    session = spdy.Session(sock, server=True, on_stream=on_stream, initial=initial)
    reader = threading.Thread(target=session.run, name="spdy-reader", daemon=True)
    reader.start()
    deadline = time.monotonic() + creation_timeout
    while not ready.wait(0.05):
        if session.closed.is_set() or time.monotonic() > deadline:
            session.close()
            raise TimeoutError(f"the client did not open the streams {sorted(wanted - set(got))}")

    disconnected = threading.Event()

    def watch():
        reader.join()
        disconnected.set()

    threading.Thread(target=watch, name="spdy-watch", daemon=True).start()
    error = got["error"]

    def write_status(data: bytes):
        if data:
            error.write(data)
        error.close()

    def finish():
        for kind in ("stdout", "stderr"):
            if kind in got:
                got[kind].close()
        session.goaway()
        # Let the client read everything and hang up first (dropping the socket early can make Go's
        # spdystream discard frames it has queued); then close anyway.
        reader.join(5)
        session.close()

    resize = ResizeEvents(got["resize"]) if "resize" in got else None
    return Streams(protocol=protocol, tty=opts.tty, stdin=got.get("stdin") if opts.stdin else None,
                   stdout=got.get("stdout") if opts.stdout else None,
                   stderr=got.get("stderr") if opts.stderr and not opts.tty else None,
                   resize=resize, disconnected=disconnected, _status_writer=write_status, _finish=finish)


# ---- WebSocket ----------------------------------------------------------------------------------

class _ChannelWriter:
    def __init__(self, conn: ws.ChannelConnection, channel: int):
        self.conn = conn
        self.channel = channel
        self.closed = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # keep messages moderate: clients buffer whole messages
            self.conn.send(self.channel, view[:256 * 1024])
            view = view[256 * 1024:]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.conn.close_channel(self.channel)
            except OSError:
                pass


def websocket_streams(sock: socket.socket, initial: bytes, protocol: str, opts: Options) -> Streams:
    stdin = InputStream() if opts.stdin else None
    resize_in = InputStream() if opts.tty else None

    def on_data(channel: int, data: bytes):
        if channel == STDIN and stdin is not None:
            stdin.feed(data)
        elif channel == RESIZE and resize_in is not None:
            resize_in.feed(data)

    def on_close_channel(channel: int):
        if channel == STDIN and stdin is not None:
            stdin.end()
        elif channel == RESIZE and resize_in is not None:
            resize_in.end()

    conn = ws.ChannelConnection(sock, client=False, protocol=protocol, initial=initial,
                                on_data=on_data, on_close_channel=on_close_channel)
    disconnected = threading.Event()

    def reader():
        conn.run()
        for s in (stdin, resize_in):
            if s is not None:
                s.end()
        disconnected.set()

    thread = threading.Thread(target=reader, name="ws-reader", daemon=True)
    thread.start()
    stdout = _ChannelWriter(conn, STDOUT) if opts.stdout else None
    stderr = _ChannelWriter(conn, STDERR) if opts.stderr and not opts.tty else None
    # Kubelet tells the client the connection is established with an empty message on the lowest
    # writable channel.
    try:
        conn.send(STDOUT if stdout else STDERR if stderr else ERROR, b"")
    except OSError:
        pass

    def write_status(data: bytes):
        if data:
            conn.send(ERROR, data)
        conn.close_channel(ERROR)

    def finish():
        conn.close()
        thread.join(5)
        conn.abort()

    return Streams(protocol=protocol, tty=opts.tty, stdin=stdin, stdout=stdout, stderr=stderr,
                   resize=ResizeEvents(resize_in) if resize_in else None, disconnected=disconnected,
                   _status_writer=write_status, _finish=finish)
