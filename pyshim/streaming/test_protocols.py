"""Tokens, Status objects, resize events and the WebSocket channel protocol."""
import json
import socket
import threading

import h11

from pyshim.streaming import remotecommand, ws
from pyshim.streaming.tokens import TokenCache


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_tokens_are_single_use_and_unguessable():
    cache = TokenCache(ttl=60)
    token = cache.insert("request")
    assert len(token) >= 40 and token != cache.insert("other")
    assert cache.consume(token) == "request"
    assert cache.consume(token) is None
    assert cache.consume("made-up") is None


def test_tokens_expire():
    clock = Clock()
    cache = TokenCache(ttl=60, clock=clock)
    fresh, old = cache.insert("fresh"), None
    clock.now += 30
    old = cache.insert("old")
    clock.now += 30.5
    assert cache.consume(fresh) is None  # 60.5 s old
    assert cache.consume(old) == "old"    # 30.5 s old
    cache.insert("x")
    clock.now += 61
    assert len(cache) == 0


def test_status_objects_are_what_kubectl_decodes():
    assert json.loads(remotecommand.encode_status(remotecommand.status_success(), remotecommand.V4)) == \
        {"metadata": {}, "status": "Success"}
    failed = remotecommand.status_exit_code(3, ["sh", "-c", "exit 3"])
    doc = json.loads(remotecommand.encode_status(failed, remotecommand.V5))
    assert doc["status"] == "Failure" and doc["reason"] == "NonZeroExitCode"
    assert doc["details"] == {"causes": [{"reason": "ExitCode", "message": "3"}]}
    assert remotecommand.exit_code_of(doc) == 3
    assert remotecommand.exit_code_of(remotecommand.status_success()) == 0
    assert remotecommand.exit_code_of(remotecommand.status_internal_error("boom")) is None
    # Before v4 only a failure's message travels.
    assert remotecommand.encode_status(failed, remotecommand.V3).startswith(b"command terminated")
    assert remotecommand.encode_status(remotecommand.status_success(), remotecommand.V2) == b""


def test_resize_events_split_across_chunks():
    source = remotecommand.InputStream()
    for chunk in (b'{"Width":80,"Hei', b'ght":24}\n{"Width":', b'100,"Height":30}', b""):
        source.feed(chunk) if chunk else source.end()
    events = remotecommand.ResizeEvents(source)
    assert events.next() == (80, 24)
    assert events.next() == (100, 30)
    assert events.next() is None


def test_expected_streams():
    o = remotecommand.Options(stdin=True, stdout=True, stderr=False, tty=True)
    assert o.expected(remotecommand.V4) == {"error", "stdin", "stdout", "resize"}
    assert o.expected(remotecommand.V2) == {"error", "stdin", "stdout"}
    o = remotecommand.Options(stdin=False, stdout=True, stderr=True, tty=False)
    assert o.expected(remotecommand.V4) == {"error", "stdout", "stderr"}


def test_websocket_channels_and_v5_close():
    a, b = socket.socketpair()
    got, closed = [], []
    server = ws.ChannelConnection(a, client=False, protocol=ws.V5_PROTOCOL,
                                  on_data=lambda c, d: got.append((c, d)), on_close_channel=closed.append)
    client = ws.ChannelConnection(b, client=True, protocol=ws.V5_PROTOCOL,
                                  on_data=lambda c, d: got.append(("client", c, d)))
    threads = [threading.Thread(target=x.run, daemon=True) for x in (server, client)]
    for t in threads:
        t.start()
    client.send(0, b"stdin data")
    client.close_channel(0)
    server.send(1, b"out")
    server.close()
    for t in threads:
        t.join(5)
    assert (0, b"stdin data") in got and ("client", 1, b"out") in got
    assert closed == [0]
    a.close()
    b.close()


def test_websocket_accept_token_from_rfc6455():
    assert ws.accept_token("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert ws.check_accept("dGhlIHNhbXBsZSBub25jZQ==", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")


class _NoBackend:
    def exec(self, request, streams):
        raise AssertionError("nothing may run for a bad token")

    attach = exec
    connect_port = exec


def test_server_answers_404_for_unknown_tokens():
    from pyshim.streaming.client import UpgradeFailed, upgrade
    from pyshim.streaming.server import ExecRequest, StreamingServer

    server = StreamingServer(_NoBackend(), port=0, token_ttl=0.0).start()
    try:
        expired = server.url_for(ExecRequest("c", ["true"]))  # ttl 0: expired at once
        for url in (expired, server.base_url + "/exec/nope", server.base_url + "/other/x"):
            for transport in ("spdy", "websocket"):
                try:
                    upgrade(url, transport, [remotecommand.V4])
                except UpgradeFailed as e:
                    assert e.status == 404
                else:
                    raise AssertionError(f"{url} was upgraded")
    finally:
        server.stop()
