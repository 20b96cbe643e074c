"""A minimal stand-in for `ssh node-b pyshim checkpoint-image receive` in bench-migrate: one TCP connection
across the wire between the nodes, so that `pyshim migrate --direct` is measured over the same path as the
raw TCP copy.

    python -m bench.direct_relay serve IP PORT -- RECEIVE-COMMAND...   (in node B's netns, runs forever)
    python -m bench.direct_relay send IP PORT ARGS...                  (the --direct command on node A)

`send` passes its ARGS (what migrate appends: --check, or --stdin-frames) as one JSON line at once (so
the receiver starts while the source still checkpoints), then its stdin; `serve` runs RECEIVE-COMMAND ARGS with the rest of the connection as stdin
and answers its stdout as it comes, then its exit status and stderr. Benchmark tooling only: no authentication, loopback wire only.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading


def serve(ip: str, port: int, command: list[str]) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, port))
    srv.listen(4)
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            header = b""
            while not header.endswith(b"\n"):
                byte = conn.recv(1)
                if not byte:
                    break
                header += byte
            args = json.loads(header or b"[]")
            # The connection's fd is the receiver's stdin: the archive goes from the socket straight to it.
            # Its stdout is passed on line by line as it comes (`stored ...` before the receiver's sync),
            # then its exit status and stderr: one JSON object per line.
            with tempfile.TemporaryFile() as stderr:
                proc = subprocess.Popen([*command, *args], stdin=conn.fileno(), stdout=subprocess.PIPE, stderr=stderr)
                try:
                    for line in proc.stdout:
                        conn.sendall(json.dumps({"stdout": line.decode("utf-8", "replace")}).encode() + b"\n")
                    proc.wait()
                    stderr.seek(0)
                    conn.sendall(json.dumps({"rc": proc.returncode,
                                             "stderr": stderr.read().decode("utf-8", "replace")}).encode() + b"\n")
                except OSError:
                    pass  # the sender went away (migrate cancelled its receiver)
                finally:
                    proc.stdout.close()
                    proc.wait()


def send(ip: str, port: int, args: list[str]) -> int:
    with socket.create_connection((ip, port), timeout=1800) as s:
        s.sendall(json.dumps(args).encode() + b"\n")
        # The answers are passed on as they come (`stored ...` arrives while stdin is still open).
        result: dict = {}
        answers = threading.Thread(target=_pass_answers, args=(s, result), daemon=True)
        answers.start()
        if "--check" not in args:
            # stdin: the framed archive from migrate, kept open until the move tells the receiver to sync
            try:
                _forward_stdin(s)
            except OSError:
                pass  # the receiver side went away: its answer says why
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        answers.join()
    sys.stderr.write(result.get("stderr", "the relay's connection ended without an exit status\n"))
    return int(result.get("rc", 1))


def _forward_stdin(s: socket.socket) -> None:
    """stdin to the socket with splice(2) when stdin is a pipe (as migrate starts us): the bytes stay in the
    kernel, as in the raw TCP copy's sendfile; a user-space copy costs this 2-CPU VM 0.3-0.6 s per GiB."""
    s.settimeout(None)  # blocking: splice into a socket with a timeout (non-blocking) fails with EAGAIN
    try:
        while os.splice(sys.stdin.fileno(), s.fileno(), 1 << 20):
            pass
        return
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: stdin is not a pipe (nothing was read from it)
            raise
    while chunk := sys.stdin.buffer.read1(1 << 20):
        s.sendall(chunk)


def _pass_answers(s: socket.socket, result: dict) -> None:
    for line in s.makefile("rb"):
        answer = json.loads(line)
        if "stdout" in answer:
            sys.stdout.write(answer["stdout"])
            sys.stdout.flush()
        else:
            result.update(answer)


def main() -> None:
    mode, ip, port, *rest = sys.argv[1:]
    if mode == "serve":
        serve(ip, int(port), rest[1:] if rest[:1] == ["--"] else rest)
    else:
        raise SystemExit(send(ip, int(port), rest))


if __name__ == "__main__":
    main()
