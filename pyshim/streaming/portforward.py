"""The Kubernetes port-forward protocol, server side.

SPDY (`portforward.k8s.io`): per forwarded connection the client opens two streams, both with headers
`port` and `requestid`, one with `streamtype: error` and one with `streamtype: data`; the server
connects to the port when it has both, copies bytes both ways on the data stream, and writes a failure
(e.g. a refused connection) as text on the error stream. Any number of pairs, concurrently.

WebSocket (`v4.channel.k8s.io`, or no subprotocol): the ports come with the request; port i gets
channel 2i for data and 2i+1 for errors, and the first message on each carries the port as two bytes,
little-endian. One connection per port.
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time

from pyshim.streaming import spdy, ws

log = logging.getLogger(__name__)

PROTOCOL = "portforward.k8s.io"
WEBSOCKET_PROTOCOLS = ["v4.channel.k8s.io", ""]
STREAM_CREATION_TIMEOUT = 30.0
CHUNK = 256 * 1024


def _error_message(port: int, target: str, error: Exception) -> str:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return f"error forwarding port {port} to pod {target}, uid : failed to connect to 127.0.0.1:{port} " \
           f"inside the pod's network namespace: {reason}"


def pump_socket_to(sock: socket.socket, write, done) -> None:
    """Copy what the pod sends to write(); call done() at its end."""
    try:
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            write(data)
    except OSError:
        pass
    finally:
        done()


def serve_spdy(sock: socket.socket, initial: bytes, connect, target: str) -> None:
    """connect(port) -> a connected socket inside the pod (raises OSError)."""
    pairs: dict[str, dict[str, spdy.Stream]] = {}
    lock = threading.Lock()
    workers: list[threading.Thread] = []

    def on_stream(stream: spdy.Stream):
        port_text, kind = stream.header("port"), stream.header("streamtype")
        if not port_text or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return False
        if kind not in ("data", "error"):
            return False
        request_id = stream.header("requestid")
        if not request_id:  # clients before request ids: kubelet's best-effort pairing
            request_id = str(stream.id if kind == "error" else stream.id - 2)
        with lock:
            pair = pairs.setdefault(request_id, {"created": time.monotonic()})
            if kind in pair:
                return False
            pair[kind] = stream
            if "data" in pair and "error" in pair:
                del pairs[request_id]
                t = threading.Thread(target=_forward_pair, args=(pair["data"], pair["error"], connect, target),
                                     name=f"portforward-{port_text}", daemon=True)
                workers.append(t)
                t.start()
        return True

    session = spdy.Session(sock, server=True, on_stream=on_stream, initial=initial)
    reader = threading.Thread(target=session.run, name="spdy-reader", daemon=True)
    reader.start()
    while reader.is_alive():
        reader.join(1)
        now = time.monotonic()
        with lock:
            stale = [rid for rid, p in pairs.items() if now - p["created"] > STREAM_CREATION_TIMEOUT]
            for rid in stale:
                pair = pairs.pop(rid)
                if "error" in pair:
                    try:
                        pair["error"].write(f"(request={rid}) timed out waiting for streams".encode())
                    except OSError:
                        pass
                for s in pair.values():
                    if isinstance(s, spdy.Stream):
                        s.send_reset(spdy.CANCEL)
    session.close()
    for t in workers:
        t.join(5)


def _forward_pair(data: spdy.Stream, error: spdy.Stream, connect, target: str) -> None:
    port = int(data.header("port"))
    try:
        try:
            conn = connect(port)
        except OSError as e:
            error.write(_error_message(port, target, e).encode())
            return
        try:
            down = threading.Thread(target=pump_socket_to, args=(conn, data.write, data.close), daemon=True)
            down.start()
            try:
                while chunk := data.read():
                    conn.sendall(chunk)
            except OSError:
                pass
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            down.join()
        finally:
            conn.close()
    except OSError:
        pass
    finally:
        data.close()
        error.close()
        data.session.forget(data)
        error.session.forget(error)


def serve_websocket(sock: socket.socket, initial: bytes, protocol: str, ports: list[int], connect,
                    target: str) -> None:
    conns: dict[int, socket.socket] = {}
    ready = threading.Event()

    def on_data(channel: int, data: bytes):
        ready.wait()
        index, is_error = divmod(channel, 2)
        conn = conns.get(index)
        if conn is not None and not is_error:
            try:
                conn.sendall(data)
            except OSError:
                pass

    chan = ws.ChannelConnection(sock, client=False, protocol=protocol, initial=initial, on_data=on_data)
    reader = threading.Thread(target=chan.run, name="ws-reader", daemon=True)
    reader.start()
    workers = []
    try:
        for i, port in enumerate(ports):
            prefix = struct.pack("<H", port)
            chan.send(2 * i, prefix)
            chan.send(2 * i + 1, prefix)
        for i, port in enumerate(ports):
            try:
                conns[i] = connect(port)
            except OSError as e:
                chan.send(2 * i + 1, _error_message(port, target, e).encode())
                continue
            t = threading.Thread(target=pump_socket_to,
                                 args=(conns[i], lambda d, c=2 * i: chan.send(c, d), lambda: None), daemon=True)
            workers.append(t)
            t.start()
    except OSError:
        pass
    finally:
        ready.set()
    for t in workers:
        while t.is_alive() and reader.is_alive():
            t.join(0.5)
    for conn in conns.values():
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    for t in workers:
        t.join(5)
    for conn in conns.values():
        conn.close()
    chan.close()
    reader.join(5)
    chan.abort()
