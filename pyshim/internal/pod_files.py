"""The per-pod files bind-mounted into every container: resolv.conf, hosts, hostname.

Each is written to a temporary file and renamed over the target, so a crash never
leaves a half-written file for a container to mount. The rename gives the file a new
inode, so these must be (re)written before the containers that mount them start.
"""
from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from pathlib import Path

from pyshim.errors import Internal, InvalidArgument

HOST_RESOLV_CONF = Path("/etc/resolv.conf")

# RFC 1123 labels; the kernel caps a UTS hostname at 64 bytes.
_HOSTNAME_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^{_HOSTNAME_LABEL}(\.{_HOSTNAME_LABEL})*$")
MAX_HOSTNAME_LEN = 64

_HOSTS_LOCALHOST_LINES = (
    "127.0.0.1\tlocalhost",
    "::1\tlocalhost ip6-localhost ip6-loopback",
    "fe00::0\tip6-localnet",
    "fe00::0\tip6-mcastprefix",
    "fe00::1\tip6-allnodes",
    "fe00::2\tip6-allrouters",
)
# Debian's convention for a host name with no routable address of its own.
_NO_IP_HOSTNAME_ADDRESS = "127.0.1.1"


def validate_hostname(hostname: str) -> None:
    if (
        not isinstance(hostname, str)
        or not 0 < len(hostname) <= MAX_HOSTNAME_LEN
        or not _HOSTNAME_RE.match(hostname)
    ):
        raise InvalidArgument(
            f"invalid hostname {hostname!r}: want RFC 1123 labels, at most {MAX_HOSTNAME_LEN} characters"
        )


def write_resolv_conf(
    path: Path,
    servers: list[str],
    searches: list[str],
    options: list[str],
    host_resolv_conf: Path = HOST_RESOLV_CONF,
) -> None:
    """Write the pod's resolv.conf; with no DNS config at all, copy the host's.

    kubelet sends an empty DNSConfig for dnsPolicy Default and expects the node's
    resolver settings then.
    """
    if not servers and not searches and not options:
        _copy_host_resolv_conf(Path(path), Path(host_resolv_conf))
        return
    _atomic_write(Path(path), render_resolv_conf(servers, searches, options))


def render_resolv_conf(servers: list[str], searches: list[str], options: list[str]) -> str:
    for server in servers:
        _check_ip("DNS server", server)
    for word in [*searches, *options]:
        _check_resolv_word(word)
    lines = [f"nameserver {server}" for server in servers]
    if searches:
        lines.append("search " + " ".join(searches))
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"


def write_hosts(path: Path, hostname: str, ip: str | None) -> None:
    """Write the pod's /etc/hosts: the localhost entries and the pod's own name.

    A pod without an IP (no network attached) still resolves its own name, on 127.0.1.1.
    """
    validate_hostname(hostname)
    if ip:
        _check_ip("pod IP", ip)
    address = ip or _NO_IP_HOSTNAME_ADDRESS
    lines = [*_HOSTS_LOCALHOST_LINES, f"{address}\t{hostname}"]
    _atomic_write(Path(path), "\n".join(lines) + "\n")


def write_hostname(path: Path, hostname: str) -> None:
    validate_hostname(hostname)
    _atomic_write(Path(path), hostname + "\n")


def _copy_host_resolv_conf(path: Path, host_resolv_conf: Path) -> None:
    try:
        content = host_resolv_conf.read_bytes()
    except FileNotFoundError:
        # No resolver configured on the host: an empty file means "use defaults",
        # same as the host itself gets.
        content = b""
    except OSError as exc:
        raise Internal(f"reading host resolver config {host_resolv_conf}: {exc}") from exc
    _atomic_write(path, content)


def _check_ip(what: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise InvalidArgument(f"invalid {what} {value!r}: not an IP address") from exc


def _check_resolv_word(word: str) -> None:
    # One whitespace-free token each: anything else would add or break resolv.conf lines.
    if not isinstance(word, str) or not word or any(c.isspace() for c in word) or "\x00" in word:
        raise InvalidArgument(f"invalid DNS search domain or option {word!r}: must be one word")


def _atomic_write(path: Path, content: str | bytes) -> None:
    data = content.encode() if isinstance(content, str) else content
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600; containers run as any user and must read these.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise Internal(f"writing {path}: {exc}") from exc
        raise
