"""A real distribution registry (Debian's docker-registry) on a free loopback port, for tests.

Tests talk to the real thing rather than a fake so that what pull/push get right here is what
they get right against registries people actually run.
"""
from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REGISTRY_BINARY = "/usr/bin/docker-registry"


def free_loopback_port(host: str = "127.0.0.1") -> int:
    # The port may be taken again before the registry binds it; start() retries on that.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RegistryServer:
    """Context manager: `with RegistryServer() as reg: reg.address  # "127.0.0.1:PORT"`.

    `auth_yaml` is an optional YAML block placed under `auth:` (e.g. an htpasswd or token
    section), indented by the caller's lines as they should appear below `auth:`.

    `host` is the address to listen on: loopback by default; the two-node tests put it on the
    wire bridge's address so that daemons in other network namespaces reach it too.
    """

    def __init__(self, binary: str = REGISTRY_BINARY, auth_yaml: str = "",
                 startup_timeout: float = 20.0, host: str = "127.0.0.1"):
        self.binary = binary
        self.host = host
        self.auth_yaml = auth_yaml
        self.startup_timeout = startup_timeout
        self.workdir: Path | None = None
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("registry server is not running")
        return f"{self.host}:{self.port}"

    @property
    def storage_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "storage"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "registry.log"

    def __enter__(self) -> "RegistryServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> None:
        if not os.access(self.binary, os.X_OK):
            raise RuntimeError(f"{self.binary} is not installed (Debian package docker-registry)")
        self.workdir = Path(tempfile.mkdtemp(prefix="pyshim-registry-"))
        try:
            for attempt in range(attempts):
                self.port = free_loopback_port(self.host)
                config = self._write_config()
                self._log_file = open(self.log_path, "ab")
                self._proc = subprocess.Popen(
                    [self.binary, "serve", str(config)],
                    stdin=subprocess.DEVNULL, stdout=self._log_file,
                    stderr=subprocess.STDOUT, start_new_session=True)
                if self._wait_until_ready():
                    return
                self._terminate()
            raise RuntimeError(f"docker-registry did not answer on /v2/ after {attempts} attempts; "
                               f"log:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._terminate()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        self.port = None

    def _write_config(self) -> Path:
        assert self.workdir is not None
        self.storage_dir.mkdir(exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage_dir}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}:{self.port}",
        ]
        if self.auth_yaml:
            lines.append("auth:")
            lines.extend(self.auth_yaml.rstrip("\n").splitlines())
        config = self.workdir / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def _wait_until_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False  # exited: most likely the port was taken meanwhile
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
                conn.request("GET", "/v2/")
                status = conn.getresponse().status
                conn.close()
                if status in (200, 401):  # 401: up, with auth configured
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
