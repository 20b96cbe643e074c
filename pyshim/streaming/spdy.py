"""SPDY/3.1 framing and a small threaded session, as kubelet's and crictl's clients speak it.

No maintained SPDY library exists for Python, so this module is the one place that knows the wire
format (draft-ietf-httpbis-http2-00 / SPDY/3.1, as implemented by moby/spdystream, which kubectl,
crictl and kubelet use):

- control frames: 1 bit C=1, 15 bits version (3), 16 bits type, 8 bits flags, 24 bits length;
- data frames: 1 bit C=0, 31 bits stream id, 8 bits flags (FIN), 24 bits length;
- header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are a 32-bit count of name/value pairs, each a
  32-bit length-prefixed lowercase name and value (several values joined by NUL), zlib-compressed
  with the SPDY/3 dictionary, one zlib stream per direction for the whole session, SYNC_FLUSHed after
  each block.

Flow control: spdystream neither sends WINDOW_UPDATE nor honours it, so neither does this session:
received WINDOW_UPDATE and SETTINGS frames are ignored. Back-pressure comes from the reader thread,
which stops reading the socket while a stream's unread data is above a limit (as spdystream's
unbuffered data channel does).
"""
from __future__ import annotations

import collections
import logging
import socket
import struct
import threading
import zlib
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
CANCEL = 5
INTERNAL_ERROR = 6

MAX_DATA_LENGTH = (1 << 24) - 1

_HEADER_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language "
    "accept-ranges age allow authorization cache-control connection content-base content-encoding "
    "content-language content-length content-location content-md5 content-range content-type date etag "
    "expect expires from host if-match if-modified-since if-none-match if-range if-unmodified-since "
    "last-modified location max-forwards pragma proxy-authenticate proxy-authorization range referer "
    "retry-after server te trailer transfer-encoding upgrade user-agent vary via warning www-authenticate "
    "method get status"
).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
_HEADER_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
    "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
# The SPDY/3 header compression dictionary (spec section 2.6.10.1): 1423 bytes.
DICTIONARY = b"".join(struct.pack("!I", len(w)) + w.encode() for w in _HEADER_WORDS) + _HEADER_TAIL.encode()


class ProtocolError(Exception):
    """The peer sent something that is not SPDY/3."""


# ---- header blocks ---------------------------------------------------------------------------

def encode_header_block(headers: dict[str, str | list[str]]) -> bytes:
    """Uncompressed name/value block: names lowercased, several values joined by NUL."""
    parts = [struct.pack("!I", len(headers))]
    for name, value in headers.items():
        n = name.lower().encode()
        v = ("\0".join(value) if isinstance(value, (list, tuple)) else str(value)).encode()
        parts += [struct.pack("!I", len(n)), n, struct.pack("!I", len(v)), v]
    return b"".join(parts)


def decode_header_block(block: bytes) -> dict[str, list[str]]:
    try:
        (count,), pos = struct.unpack_from("!I", block, 0), 4
        headers: dict[str, list[str]] = {}
        for _ in range(count):
            (n_len,) = struct.unpack_from("!I", block, pos)
            name = block[pos + 4:pos + 4 + n_len].decode()
            pos += 4 + n_len
            (v_len,) = struct.unpack_from("!I", block, pos)
            value = block[pos + 4:pos + 4 + v_len].decode()
            pos += 4 + v_len
            if pos > len(block):
                raise ProtocolError("truncated header block")
            headers.setdefault(name.lower(), []).extend(value.split("\0"))
    except (struct.error, UnicodeDecodeError) as e:
        raise ProtocolError(f"bad header block: {e}") from None
    return headers


class HeaderCompressor:
    """One direction's zlib stream: every header block of the session goes through the same one."""

    def __init__(self):
        self._z = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY,
                                   zdict=DICTIONARY)

    def compress(self, headers: dict) -> bytes:
        return self._z.compress(encode_header_block(headers)) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    def __init__(self):
        self._z = zlib.decompressobj(zdict=DICTIONARY)

    def decompress(self, data: bytes) -> dict[str, list[str]]:
        try:
            return decode_header_block(self._z.decompress(data))
        except zlib.error as e:
            raise ProtocolError(f"header block does not decompress: {e}") from None


# ---- frames ----------------------------------------------------------------------------------

@dataclass
class Frame:
    """A parsed frame. `kind` is a control frame type, or 0 for DATA."""
    kind: int
    flags: int = 0
    stream_id: int = 0
    data: bytes = b""            # DATA payload
    headers: dict = field(default_factory=dict)
    associated_id: int = 0
    priority: int = 0
    status: int = 0              # RST_STREAM / GOAWAY status
    last_good_id: int = 0        # GOAWAY
    ping_id: int = 0
    delta: int = 0               # WINDOW_UPDATE
    settings: list = field(default_factory=list)  # [(flags, id, value)]


def control_frame(kind: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_DATA_LENGTH:
        raise ValueError("control frame too long")
    return struct.pack("!HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame_header(stream_id: int, length: int, fin: bool = False) -> bytes:
    return struct.pack("!II", stream_id & 0x7FFFFFFF, ((FLAG_FIN if fin else 0) << 24) | length)


def syn_stream(comp: HeaderCompressor, stream_id: int, headers: dict, fin: bool = False,
               unidirectional: bool = False, priority: int = 0, associated_id: int = 0) -> bytes:
    flags = (FLAG_FIN if fin else 0) | (FLAG_UNIDIRECTIONAL if unidirectional else 0)
    payload = struct.pack("!IIBB", stream_id, associated_id, (priority & 7) << 5, 0) + comp.compress(headers)
    return control_frame(SYN_STREAM, flags, payload)


def syn_reply(comp: HeaderCompressor, stream_id: int, headers: dict, fin: bool = False) -> bytes:
    return control_frame(SYN_REPLY, FLAG_FIN if fin else 0, struct.pack("!I", stream_id) + comp.compress(headers))


def headers_frame(comp: HeaderCompressor, stream_id: int, headers: dict, fin: bool = False) -> bytes:
    return control_frame(HEADERS, FLAG_FIN if fin else 0, struct.pack("!I", stream_id) + comp.compress(headers))


def rst_stream(stream_id: int, status: int) -> bytes:
    return control_frame(RST_STREAM, 0, struct.pack("!II", stream_id, status))


def settings_frame(entries: list[tuple[int, int, int]]) -> bytes:
    body = struct.pack("!I", len(entries)) + b"".join(struct.pack("!II", (f << 24) | i, v) for f, i, v in entries)
    return control_frame(SETTINGS, 0, body)


def ping_frame(ping_id: int) -> bytes:
    return control_frame(PING, 0, struct.pack("!I", ping_id))


def goaway_frame(last_good_id: int, status: int = 0) -> bytes:
    return control_frame(GOAWAY, 0, struct.pack("!II", last_good_id, status))


def window_update(stream_id: int, delta: int) -> bytes:
    return control_frame(WINDOW_UPDATE, 0, struct.pack("!II", stream_id, delta & 0x7FFFFFFF))


def parse_frame(head: bytes, payload: bytes, decomp: HeaderDecompressor) -> Frame | None:
    """One frame from its 8-byte head and its payload; None for frame types SPDY/3 ignores."""
    first, second = struct.unpack("!II", head)
    flags, length = second >> 24, second & 0xFFFFFF
    if len(payload) != length:
        raise ProtocolError("truncated frame")
    if not first & 0x80000000:
        return Frame(0, flags, first & 0x7FFFFFFF, data=payload)
    version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
    if version != VERSION:
        raise ProtocolError(f"unsupported SPDY version {version}")
    try:
        if kind == SYN_STREAM:
            sid, assoc, pri, _slot = struct.unpack_from("!IIBB", payload)
            return Frame(kind, flags, sid & 0x7FFFFFFF, associated_id=assoc & 0x7FFFFFFF, priority=pri >> 5,
                         headers=decomp.decompress(payload[10:]))
        if kind in (SYN_REPLY, HEADERS):
            (sid,) = struct.unpack_from("!I", payload)
            return Frame(kind, flags, sid & 0x7FFFFFFF, headers=decomp.decompress(payload[4:]))
        if kind == RST_STREAM:
            sid, status = struct.unpack("!II", payload)
            return Frame(kind, flags, sid & 0x7FFFFFFF, status=status)
        if kind == SETTINGS:
            (count,) = struct.unpack_from("!I", payload)
            entries = []
            for i in range(count):
                fid, value = struct.unpack_from("!II", payload, 4 + 8 * i)
                entries.append((fid >> 24, fid & 0xFFFFFF, value))
            return Frame(kind, flags, settings=entries)
        if kind == PING:
            return Frame(kind, flags, ping_id=struct.unpack("!I", payload)[0])
        if kind == GOAWAY:
            last, status = struct.unpack_from("!II", payload + b"\0" * 4)  # SPDY/2 GOAWAY had no status
            return Frame(kind, flags, last_good_id=last & 0x7FFFFFFF, status=status)
        if kind == WINDOW_UPDATE:
            sid, delta = struct.unpack("!II", payload)
            return Frame(kind, flags, sid & 0x7FFFFFFF, delta=delta & 0x7FFFFFFF)
    except struct.error as e:
        raise ProtocolError(f"malformed control frame type {kind}: {e}") from None
    return None  # unknown control frames are ignored (spec 2.2.1)


# ---- session ---------------------------------------------------------------------------------

class SessionClosed(OSError):
    pass


class Stream:
    """One SPDY stream: read() returns b"" at the peer's FIN (or reset, or a dead connection)."""

    MAX_BUFFERED = 4 << 20

    def __init__(self, session: "Session", stream_id: int, headers: dict[str, list[str]]):
        self.session = session
        self.id = stream_id
        self.headers = headers
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._cond = threading.Condition()
        self.remote_closed = False
        self.local_closed = False
        self.reset = False
        self.replied = threading.Event()
        self.reply_headers: dict = {}

    def header(self, name: str, default: str = "") -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else default

    # reader-thread side
    def _feed(self, data: bytes, fin: bool) -> None:
        with self._cond:
            if data:
                while self._buffered > self.MAX_BUFFERED and not self.reset and not self.session.closed.is_set():
                    self._cond.wait(1)
                self._chunks.append(data)
                self._buffered += len(data)
            if fin:
                self.remote_closed = True
            self._cond.notify_all()

    def _end(self, reset: bool) -> None:
        with self._cond:
            self.remote_closed = True
            self.reset = self.reset or reset
            self._cond.notify_all()
        self.replied.set()

    # user side
    def read(self, timeout: float | None = None) -> bytes:
        """The next chunk of data; b"" at end of stream."""
        with self._cond:
            while not self._chunks and not self.remote_closed:
                if not self._cond.wait(timeout):
                    raise TimeoutError("no data")
            if not self._chunks:
                return b""
            data = self._chunks.popleft()
            self._buffered -= len(data)
            self._cond.notify_all()
            return data

    def read_all(self, timeout: float | None = None) -> bytes:
        out = []
        while chunk := self.read(timeout):
            out.append(chunk)
        return b"".join(out)

    def write(self, data: bytes) -> None:
        if self.local_closed or self.reset:
            raise SessionClosed(f"stream {self.id} is closed")
        view = memoryview(data)
        while view:
            piece = view[:self.session.max_frame]
            self.session._send(data_frame_header(self.id, len(piece)), piece)
            view = view[len(piece):]

    def close(self) -> None:
        """Half-close: a FIN on an empty DATA frame (what spdystream's Close sends)."""
        if self.local_closed or self.reset:
            return
        self.local_closed = True
        try:
            self.session._send(data_frame_header(self.id, 0, fin=True))
        except OSError:
            pass

    def send_reset(self, status: int = CANCEL) -> None:
        if not self.reset:
            self.reset = True
            self.local_closed = True
            try:
                self.session._send(rst_stream(self.id, status))
            except OSError:
                pass
            self._end(True)

    def wait_reply(self, timeout: float) -> None:
        if not self.replied.wait(timeout):
            raise TimeoutError(f"no SYN_REPLY for stream {self.id} within {timeout}s")
        if self.reset:
            raise SessionClosed(f"stream {self.id} was refused")


class Session:
    """A SPDY/3.1 session on a connected socket. Call run() in a thread of its own (the reader).

    `on_stream(stream)` is called in the reader thread for each SYN_STREAM of the peer; it must not
    block. Return False to refuse the stream (RST_STREAM REFUSED_STREAM); otherwise it is accepted with
    an empty SYN_REPLY, as kubelet's server does.
    """

    def __init__(self, sock: socket.socket, server: bool, on_stream=None, initial: bytes = b"",
                 max_frame: int = 256 * 1024):
        self.sock = sock
        self.server = server
        self.on_stream = on_stream
        self.max_frame = max_frame
        self._initial = initial
        self._write_lock = threading.Lock()
        self._compressor = HeaderCompressor()
        self._decompressor = HeaderDecompressor()
        self._streams: dict[int, Stream] = {}
        self._lock = threading.Lock()
        self._next_id = 2 if server else 1
        self._next_ping = 2 if server else 1
        self.last_received_id = 0
        self.closed = threading.Event()
        self.goaway_received = threading.Event()
        self._pongs: dict[int, threading.Event] = {}

    # ---- writing
    def _send(self, *parts) -> None:
        if self.closed.is_set():
            raise SessionClosed("SPDY session is closed")
        with self._write_lock:
            try:
                if len(parts) == 1:
                    self.sock.sendall(parts[0])
                else:
                    self._sendmsg_all(list(parts))
            except OSError:
                self._shutdown()
                raise

    def _sendmsg_all(self, parts: list) -> None:
        total = sum(len(p) for p in parts)
        sent = self.sock.sendmsg(parts)
        if sent == total:
            return
        data = memoryview(b"".join(bytes(p) for p in parts))[sent:]
        self.sock.sendall(data)

    def open_stream(self, headers: dict, fin: bool = False, wait: float | None = 30) -> Stream:
        """Create a stream (client side: kubectl's CreateStream); waits for the peer's SYN_REPLY."""
        with self._write_lock:
            if self.closed.is_set():
                raise SessionClosed("SPDY session is closed")
            sid = self._next_id
            self._next_id += 2
            stream = Stream(self, sid, {k.lower(): [v] if isinstance(v, str) else list(v) for k, v in headers.items()})
            with self._lock:
                self._streams[sid] = stream
            frame = syn_stream(self._compressor, sid, headers, fin=fin)
            try:
                self.sock.sendall(frame)
            except OSError:
                self._shutdown()
                raise
        if fin:
            stream.local_closed = True
        if wait:
            stream.wait_reply(wait)
        return stream

    def ping(self, timeout: float = 10) -> None:
        with self._lock:
            pid = self._next_ping
            self._next_ping += 2
            event = self._pongs[pid] = threading.Event()
        self._send(ping_frame(pid))
        if not event.wait(timeout):
            raise TimeoutError("no PING reply")

    def goaway(self) -> None:
        try:
            self._send(goaway_frame(self.last_received_id))
        except OSError:
            pass

    def close(self) -> None:
        """GOAWAY, then close the socket."""
        if not self.closed.is_set():
            self.goaway()
        self._shutdown()

    def _shutdown(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            s._end(reset=not s.remote_closed)

    # ---- reading
    def _read_exact(self, buf: bytearray, n: int) -> bytes | None:
        while len(buf) < n:
            chunk = self.sock.recv(max(n - len(buf), 256 * 1024))
            if not chunk:
                return None
            buf += chunk
        return buf

    def run(self) -> None:
        """The reader loop; returns when the connection ends. Closes the session on the way out."""
        buf = bytearray(self._initial)
        try:
            while True:
                if self._read_exact(buf, 8) is None:
                    break
                length = int.from_bytes(buf[5:8], "big")
                if self._read_exact(buf, 8 + length) is None:
                    break
                head, payload = bytes(buf[:8]), bytes(buf[8:8 + length])
                del buf[:8 + length]
                frame = parse_frame(head, payload, self._decompressor)
                if frame is not None:
                    self._dispatch(frame)
        except ProtocolError as e:
            log.info("SPDY protocol error, closing the session", extra={"error": str(e)})
            try:
                self._send(goaway_frame(self.last_received_id, 1))
            except OSError:
                pass
        except OSError:
            pass
        finally:
            self._shutdown()  # the owner closes the socket once its writers are done

    def _dispatch(self, f: Frame) -> None:
        if f.kind == 0:
            stream = self._streams.get(f.stream_id)
            if stream is not None:
                stream._feed(f.data, bool(f.flags & FLAG_FIN))
            return
        if f.kind == SYN_STREAM:
            self._on_syn_stream(f)
        elif f.kind == SYN_REPLY:
            stream = self._streams.get(f.stream_id)
            if stream is not None:
                stream.reply_headers = f.headers
                stream.replied.set()
                if f.flags & FLAG_FIN:
                    stream._feed(b"", True)
        elif f.kind == HEADERS:
            stream = self._streams.get(f.stream_id)
            if stream is not None and f.flags & FLAG_FIN:
                stream._feed(b"", True)
        elif f.kind == RST_STREAM:
            with self._lock:
                stream = self._streams.pop(f.stream_id, None)
            if stream is not None:
                stream.local_closed = True
                stream._end(reset=True)
        elif f.kind == PING:
            if (f.ping_id & 1) == (self._next_ping & 1):
                event = self._pongs.pop(f.ping_id, None)
                if event:
                    event.set()
            else:
                self._send(ping_frame(f.ping_id))
        elif f.kind == GOAWAY:
            self.goaway_received.set()
        # SETTINGS and WINDOW_UPDATE: no flow control, as spdystream.

    def _on_syn_stream(self, f: Frame) -> None:
        sid = f.stream_id
        peer_parity = 1 if self.server else 0
        if sid == 0 or sid % 2 != peer_parity or sid <= self.last_received_id or self.goaway_received.is_set():
            self._send(rst_stream(sid, PROTOCOL_ERROR))
            return
        self.last_received_id = sid
        stream = Stream(self, sid, f.headers)
        if f.flags & FLAG_FIN:
            stream.remote_closed = True
        if f.flags & FLAG_UNIDIRECTIONAL:
            stream.local_closed = True
        with self._lock:
            self._streams[sid] = stream
        accepted = True
        if self.on_stream is not None:
            try:
                accepted = self.on_stream(stream) is not False
            except Exception:  # noqa: BLE001 - a bad handler refuses the stream, the session goes on
                log.exception("SPDY stream handler failed")
                accepted = False
        if not accepted:
            with self._lock:
                self._streams.pop(sid, None)
            stream.send_reset(REFUSED_STREAM)
            return
        with self._write_lock:
            self.sock.sendall(syn_reply(self._compressor, sid, {}))
        stream.replied.set()

    def forget(self, stream: Stream) -> None:
        with self._lock:
            self._streams.pop(stream.id, None)
