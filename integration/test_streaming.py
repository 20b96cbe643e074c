"""Exec, Attach and PortForward through pyshim's streaming server, against a real daemon, runc and conmon.

Clients: pyshim's own (pyshim.streaming.client, SPDY and WebSocket), and as an independent one the
`kubernetes` package's WebSocket client (kubernetes.stream.ws_client), when installed.
"""
from __future__ import annotations

import socket
import time

import grpc
import pytest

from cri_api import api_pb2 as cri
from integration.conftest import container_config, pod_config
from pyshim.streaming.client import (PortForwardSession, RemoteCommand, UpgradeFailed, exit_code, upgrade)

TRANSPORTS = ["spdy", "websocket"]


def run_container(client, image, command, **kwargs):
    pod = pod_config()
    pod_id = client.run_pod(pod)
    cid = client.create(pod_id, container_config(image, command, **kwargs), pod)
    client.start(cid)
    return pod_id, cid


def remove_pod(client, pod_id):
    client.stop_pod(pod_id)
    client.remove_pod(pod_id)


def exec_url(client, cid, cmd, tty=False, stdin=False, stdout=True, stderr=True) -> str:
    return client.runtime.Exec(cri.ExecRequest(container_id=cid, cmd=cmd, tty=tty, stdin=stdin, stdout=stdout,
                                               stderr=stderr and not tty), timeout=30).url


@pytest.fixture
def sleeper(client, pulled_busybox):
    pod_id, cid = run_container(client, pulled_busybox, ["sleep", "3600"])
    yield cid
    remove_pod(client, pod_id)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_separates_stdout_and_stderr_and_reports_exit_code(client, sleeper, transport):
    url = exec_url(client, sleeper, ["sh", "-c", "echo to-out; echo to-err >&2; exit 3"])
    assert url.startswith("http://127.0.0.1:")
    rc = RemoteCommand(url, transport)
    status = rc.wait()
    assert rc.stdout == b"to-out\n"
    assert rc.stderr == b"to-err\n"
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    assert exit_code(status) == 3

    rc = RemoteCommand(exec_url(client, sleeper, ["true"]), transport)
    assert rc.wait() == {"metadata": {}, "status": "Success"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_stdin_is_echoed_until_eof(client, sleeper, transport):
    rc = RemoteCommand(exec_url(client, sleeper, ["cat"], stdin=True), transport, stdin=True)
    rc.write_stdin(b"hello through the pipe\n")
    rc.wait_stdout(b"hello through the pipe\n")
    rc.write_stdin(b"second line\n")
    rc.close_stdin()
    status = rc.wait()
    assert exit_code(status) == 0
    assert rc.stdout == b"hello through the pipe\nsecond line\n"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_with_tty_echoes_input_and_follows_resize(client, sleeper, transport):
    url = exec_url(client, sleeper, ["sh", "-c", "read line; echo got:$line; stty size; exit 5"], tty=True,
                   stdin=True)
    rc = RemoteCommand(url, transport, stdin=True, tty=True)
    rc.resize(101, 33)
    time.sleep(0.3)
    rc.write_stdin(b"abc\r")
    status = rc.wait()
    out = rc.stdout
    assert b"got:abc\r\n" in out, out  # the terminal turns \n into \r\n
    assert b"33 101\r\n" in out, out
    assert rc.stderr == b""
    assert exit_code(status) == 5


def test_exec_tty_resize_after_start(client, sleeper):
    url = exec_url(client, sleeper, ["sh", "-c", "stty size; read x; stty size"], tty=True, stdin=True)
    rc = RemoteCommand(url, "spdy", stdin=True, tty=True)
    rc.resize(80, 24)
    time.sleep(0.3)
    rc.resize(120, 40)
    time.sleep(0.3)
    rc.write_stdin(b"\r")
    assert exit_code(rc.wait()) == 0
    assert b"40 120" in rc.stdout, rc.stdout


def test_token_is_single_use_and_expires(client, sleeper, daemon, tmp_path):
    url = exec_url(client, sleeper, ["sh", "-c", "echo ran >> /tmp/ran-marker"])
    assert exit_code(RemoteCommand(url, "spdy").wait()) == 0
    for transport in TRANSPORTS:
        with pytest.raises(UpgradeFailed) as failed:
            upgrade(url, transport, ["v4.channel.k8s.io"])
        assert failed.value.status == 404
    bogus = url.rsplit("/", 1)[0] + "/not-a-token"
    with pytest.raises(UpgradeFailed) as failed:
        upgrade(bogus, "spdy", ["v4.channel.k8s.io"])
    assert failed.value.status == 404
    # The command ran exactly once.
    assert client.exec_sync(sleeper, ["cat", "/tmp/ran-marker"]).stdout == b"ran\n"


def test_exec_in_stopped_container_fails_precondition(client, pulled_busybox):
    pod_id, cid = run_container(client, pulled_busybox, ["true"])
    try:
        deadline = time.monotonic() + 15
        while client.status(cid).status.state != cri.CONTAINER_EXITED and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as failed:
            exec_url(client, cid, ["true"])
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as failed:
            client.runtime.Attach(cri.AttachRequest(container_id=cid, stdout=True), timeout=30)
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        remove_pod(client, pod_id)


def test_bad_exec_requests_are_refused(client, sleeper):
    for request in (cri.ExecRequest(container_id=sleeper, cmd=[], stdout=True),
                    cri.ExecRequest(container_id=sleeper, cmd=["true"], tty=True, stderr=True),
                    cri.ExecRequest(container_id=sleeper, cmd=["true"])):
        with pytest.raises(grpc.RpcError) as failed:
            client.runtime.Exec(request, timeout=30)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as failed:
        exec_url(client, "no-such-container", ["true"])
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND


def _processes(client, cid) -> str:
    return client.exec_sync(cid, ["ps", "-o", "pid,args"]).stdout.decode()


@pytest.mark.parametrize("tty", [False, True])
def test_client_that_disconnects_leaves_no_exec_process(client, sleeper, tty):
    url = exec_url(client, sleeper, ["sh", "-c", "echo started; exec sleep 4242"], tty=tty, stdin=tty)
    rc = RemoteCommand(url, "spdy", stdin=tty, tty=tty)
    rc.wait_stdout(b"started")
    assert "sleep 4242" in _processes(client, sleeper)
    rc.abort()
    deadline = time.monotonic() + 10
    while "sleep 4242" in _processes(client, sleeper):
        assert time.monotonic() < deadline, _processes(client, sleeper)
        time.sleep(0.1)


def test_exec_with_the_kubernetes_websocket_client(client, sleeper):
    """An independent implementation of the v4/v5 channel protocol: the kubernetes package's WSClient."""
    ws_client = pytest.importorskip("kubernetes.stream.ws_client")
    from kubernetes.client import Configuration

    url = exec_url(client, sleeper, ["sh", "-c", "echo k8s-out; echo k8s-err >&2; exit 7"])
    k = ws_client.WSClient(Configuration(), url.replace("http://", "ws://"), headers=None, capture_all=True)
    k.run_forever(timeout=30)
    assert k.read_channel(1) == "k8s-out\n"
    assert k.read_channel(2) == "k8s-err\n"
    assert k.returncode == 7

    url = exec_url(client, sleeper, ["cat"], stdin=True)
    k = ws_client.WSClient(Configuration(), url.replace("http://", "ws://"), headers=None, capture_all=True)
    k.write_stdin("from kubernetes\n")
    deadline = time.monotonic() + 10
    out = ""
    while "from kubernetes" not in out and time.monotonic() < deadline:
        k.update(timeout=1)
        out += k.read_stdout() if k.peek_stdout() else ""
    assert "from kubernetes\n" in out
    k.close()


# ---- attach -------------------------------------------------------------------------------------

READ_LOOP = ('echo ready; while read l; do [ "$l" = quit ] && { echo bye; exit 0; }; '
             'echo "got:$l"; echo "err:$l" >&2; done')


def attach_url(client, cid, stdin=True, tty=False) -> str:
    return client.runtime.Attach(cri.AttachRequest(container_id=cid, stdin=stdin, stdout=True, stderr=not tty,
                                                   tty=tty), timeout=30).url


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_attach_sees_output_takes_input_and_ends_when_the_container_exits(client, pulled_busybox, transport):
    pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", READ_LOOP], stdin=True)
    try:
        rc = RemoteCommand(attach_url(client, cid), transport, stdin=True)
        rc.write_stdin(b"hello\n")
        rc.wait_stdout(b"got:hello\n")
        deadline = time.monotonic() + 10
        while b"err:hello\n" not in rc.stderr:
            assert time.monotonic() < deadline, rc.stderr
            time.sleep(0.05)
        rc.write_stdin(b"quit\n")
        status = rc.wait(20)  # the container's exit ends the attach
        assert exit_code(status) == 0, status
        assert rc.stdout.endswith(b"bye\n")
        deadline = time.monotonic() + 10
        while client.status(cid).status.state != cri.CONTAINER_EXITED:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        remove_pod(client, pod_id)


def test_attach_client_leaving_keeps_the_container_running(client, pulled_busybox):
    pod_id, cid = run_container(client, pulled_busybox, ["sh", "-c", READ_LOOP], stdin=True)
    try:
        rc = RemoteCommand(attach_url(client, cid), "spdy", stdin=True)
        rc.write_stdin(b"one\n")
        rc.wait_stdout(b"got:one\n")
        rc.abort()
        time.sleep(0.5)
        assert client.status(cid).status.state == cri.CONTAINER_RUNNING
        rc = RemoteCommand(attach_url(client, cid), "websocket", stdin=True)
        rc.write_stdin(b"two\n")
        rc.wait_stdout(b"got:two\n")
        rc.close()
    finally:
        remove_pod(client, pod_id)


# ---- port-forward -------------------------------------------------------------------------------

ECHO_SERVERS = ["sh", "-c", "nc -ll -p 8080 -e cat & nc -ll -p 8081 -e cat & wait"]


def port_forward_url(client, pod_id, ports=()) -> str:
    return client.runtime.PortForward(cri.PortForwardRequest(pod_sandbox_id=pod_id, port=list(ports)),
                                      timeout=30).url


def _echo(conn, payload: bytes) -> bytes:
    conn.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = conn.recv(10)
        assert chunk, f"connection ended after {got!r}"
        got += chunk
    return got


def _wait_listening(client, cid, ports):
    deadline = time.monotonic() + 10
    while True:
        out = client.exec_sync(cid, ["netstat", "-ltn"]).stdout.decode()
        if all(f":{p} " in out for p in ports):
            return
        assert time.monotonic() < deadline, out
        time.sleep(0.1)


def test_port_forward_two_ports_at_once_and_a_closed_one_over_spdy(client, pulled_busybox):
    pod_id, cid = run_container(client, pulled_busybox, ECHO_SERVERS)
    try:
        _wait_listening(client, cid, (8080, 8081))
        session = PortForwardSession(port_forward_url(client, pod_id))
        try:
            a, b = session.connect(8080), session.connect(8081)
            a2 = session.connect(8080)  # two connections to one port, concurrently
            assert _echo(a, b"to 8080\n") == b"to 8080\n"
            assert _echo(b, b"to 8081\n") == b"to 8081\n"
            assert _echo(a2, b"again 8080\n") == b"again 8080\n"
            closed = session.connect(9)
            message = closed.error(10)
            assert "error forwarding port 9" in message and "refused" in message, message
            assert closed.recv(10) == b""
            # The others keep working.
            big = bytes(range(256)) * 4096
            assert _echo(a, big) == big
            assert _echo(b, b"still here\n") == b"still here\n"
            for conn in (a, b, a2):
                conn.shutdown_write()
                assert conn.recv(10) == b""
                assert conn.error(10) == ""
        finally:
            session.close()
    finally:
        remove_pod(client, pod_id)


def test_port_forward_over_websocket(client, pulled_busybox):
    from pyshim.streaming import ws
    from pyshim.streaming.client import upgrade as ws_upgrade

    pod_id, cid = run_container(client, pulled_busybox, ECHO_SERVERS)
    try:
        _wait_listening(client, cid, (8080, 8081))
        url = port_forward_url(client, pod_id, [8080, 8081, 9])
        sock, protocol, initial = ws_upgrade(url, "websocket", ["v4.channel.k8s.io"])
        assert protocol == "v4.channel.k8s.io"
        got: dict[int, bytearray] = {}
        cond = __import__("threading").Condition()

        def on_data(channel, data):
            with cond:
                got.setdefault(channel, bytearray()).extend(data)
                cond.notify_all()

        conn = ws.ChannelConnection(sock, client=True, protocol=protocol, initial=initial, on_data=on_data)
        reader = __import__("threading").Thread(target=conn.run, daemon=True)
        reader.start()

        def wait(channel, predicate):
            with cond:
                assert cond.wait_for(lambda: predicate(bytes(got.get(channel, b""))), 10), got

        # The first message on every channel is its port, two bytes little-endian.
        for i, port in enumerate((8080, 8081, 9)):
            wait(2 * i, lambda d, p=port: d[:2] == p.to_bytes(2, "little"))
            wait(2 * i + 1, lambda d, p=port: d[:2] == p.to_bytes(2, "little"))
        wait(5, lambda d: b"refused" in d)
        conn.send(0, b"ws to 8080\n")
        conn.send(2, b"ws to 8081\n")
        wait(0, lambda d: d[2:] == b"ws to 8080\n")
        wait(2, lambda d: d[2:] == b"ws to 8081\n")
        conn.close()
        reader.join(10)
        sock.close()
    finally:
        remove_pod(client, pod_id)


# ---- the pyshim CLI -----------------------------------------------------------------------------

def _pyshim(daemon, *args, **kwargs):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pyshim", *args[:1], "--endpoint", str(daemon.settings.socket),
                           *args[1:]], capture_output=True, timeout=60, **kwargs)


def test_cli_exec_interactive_and_not(client, sleeper, daemon):
    done = _pyshim(daemon, "exec", "-i", sleeper, "--", "sh", "-c", "cat; echo err >&2; exit 4", input=b"piped\n")
    assert (done.returncode, done.stdout, done.stderr) == (4, b"piped\n", b"err\n")
    done = _pyshim(daemon, "exec", "-i", "--transport", "websocket", sleeper, "--", "cat", input=b"over ws\n")
    assert (done.returncode, done.stdout) == (0, b"over ws\n")
    done = _pyshim(daemon, "exec", "-t", sleeper, "--", "sh", "-c", "echo in-tty; exit 2")
    assert done.returncode == 2 and done.stdout == b"in-tty\r\n"
    done = _pyshim(daemon, "exec", sleeper, "--", "echo", "sync")  # no -i/-t: ExecSync as before
    assert (done.returncode, done.stdout) == (0, b"sync\n")


def test_cli_port_forward(client, pulled_busybox, daemon):
    import subprocess
    import sys

    pod_id, cid = run_container(client, pulled_busybox, ECHO_SERVERS)
    proc = subprocess.Popen([sys.executable, "-m", "pyshim", "port-forward", "--endpoint", str(daemon.settings.socket),
                             pod_id, "0:8080", "0:8081"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_listening(client, cid, (8080, 8081))
        ports = []
        for _ in range(2):
            line = proc.stdout.readline().decode()
            assert line.startswith("Forwarding from 127.0.0.1:"), line
            ports.append(int(line.split(":")[1].split()[0]))
        for port, text in zip(ports, (b"via cli 8080\n", b"via cli 8081\n")):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                assert _echo(s, text) == text
    finally:
        proc.terminate()
        proc.wait(10)
        remove_pod(client, pod_id)
    proc.stdout.close()
    proc.stderr.close()
