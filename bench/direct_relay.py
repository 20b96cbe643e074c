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

import json
import socket
import subprocess
import sys
import tempfile


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
        if "--check" not in args:
            # stdin: the archive file, or (--stdin-header, the receiver started early) a pipe from migrate
            while chunk := sys.stdin.buffer.read1(1 << 20):
                s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        for line in s.makefile("rb"):
            result = json.loads(line)
            if "stdout" in result:
                sys.stdout.write(result["stdout"])
                sys.stdout.flush()
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
