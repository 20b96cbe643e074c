"""A minimal stand-in for `ssh node-b pyshim checkpoint-image receive` in bench-migrate: one TCP connection
across the wire between the nodes, so that `pyshim migrate --direct` is measured over the same path as the
raw TCP copy.

    python -m bench.direct_relay serve IP PORT -- RECEIVE-COMMAND...   (in node B's netns, runs forever)
    python -m bench.direct_relay send IP PORT ARGS...                  (the --direct command on node A)

`send` passes its ARGS (what migrate appends: --check, or --stdin-header) as one JSON line at once (so
the receiver starts while the source still checkpoints), then its stdin; `serve` runs RECEIVE-COMMAND ARGS with the rest of the connection as stdin
and answers its exit status and stderr. Benchmark tooling only: no authentication, loopback wire only.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys


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
            proc = subprocess.run([*command, *args], stdin=conn.fileno(), capture_output=True)
            try:
                conn.sendall(json.dumps({"rc": proc.returncode, "stderr": proc.stderr.decode("utf-8", "replace"),
                                         "stdout": proc.stdout.decode("utf-8", "replace")}).encode())
            except OSError:
                pass  # the sender went away (migrate cancelled its receiver)


def send(ip: str, port: int, args: list[str]) -> int:
    with socket.create_connection((ip, port), timeout=1800) as s:
        s.sendall(json.dumps(args).encode() + b"\n")
        if "--check" not in args:
            # stdin: the archive file, or (--stdin-header, the receiver started early) a pipe from migrate
            while chunk := sys.stdin.buffer.read1(1 << 20):
                s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    result = json.loads(answer)
    sys.stdout.write(result["stdout"])
    sys.stderr.write(result["stderr"])
    return int(result["rc"])


def main() -> None:
    mode, ip, port, *rest = sys.argv[1:]
    if mode == "serve":
        serve(ip, int(port), rest[1:] if rest[:1] == ["--"] else rest)
    else:
        raise SystemExit(send(ip, int(port), rest))


if __name__ == "__main__":
    main()
