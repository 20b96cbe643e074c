"""Image references ("busybox", "127.0.0.1:5000/app:v1", "name@sha256:...") normalised like Docker.

Kubelet sends whatever the pod spec says, and images are stored under the fully qualified
form, so "busybox", "library/busybox" and "docker.io/library/busybox:latest" must all name
the same image.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .digest import is_digest
from .errors import InvalidReference

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
_LEGACY_DEFAULT_REGISTRY = "index.docker.io"
_OFFICIAL_NAMESPACE = "library"
_MAX_NAME_LENGTH = 255

# Grammar of github.com/distribution/reference.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_FULL_HEX_ID_RE = re.compile(r"^[a-f0-9]{64}$")


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Reference":
        if not text or text != text.strip():
            raise InvalidReference(text, "empty or surrounded by whitespace")
        name, tag, digest = _split_tag_and_digest(text)
        registry, repository = _split_registry(text, name)
        if len(registry) + 1 + len(repository) > _MAX_NAME_LENGTH:
            raise InvalidReference(text, f"name longer than {_MAX_NAME_LENGTH} characters")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, repository, tag, digest)

    @property
    def name(self) -> str:
        """registry/repository, the part before tag and digest."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    def with_tag(self, tag: str) -> "Reference":
        return Reference(self.registry, self.repository, tag, None)

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.registry, self.repository, None, digest)

    @property
    def host(self) -> str:
        """Registry host without port or IPv6 brackets."""
        return split_host_port(self.registry)[0]

    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def split_host_port(registry: str) -> tuple[str, int | None]:
    if registry.startswith("["):
        end = registry.index("]")
        host, rest = registry[1:end], registry[end + 1:]
        port = int(rest[1:]) if rest.startswith(":") else None
        return host, port
    host, sep, port = registry.partition(":")
    return host, int(port) if sep else None


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_tag_and_digest(text: str) -> tuple[str, str | None, str | None]:
    name, at, digest = text.partition("@")
    if at and not is_digest(digest):
        raise InvalidReference(text, f"malformed digest {digest!r}")
    tag = None
    colon = name.rfind(":")
    # A colon before the last slash is a registry port, not a tag separator.
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG_RE.match(tag):
            raise InvalidReference(text, f"malformed tag {tag!r}")
    return name, tag, (digest if at else None)


def _looks_like_registry(component: str) -> bool:
    # Docker's rule: a first component with '.', ':' or upper case, or "localhost", is a host.
    return ("." in component or ":" in component or component == "localhost"
            or component.lower() != component)


def _split_registry(text: str, name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if slash and _looks_like_registry(first):
        registry, repository = first, rest
        if not _DOMAIN_RE.match(registry):
            raise InvalidReference(text, f"malformed registry {registry!r}")
    else:
        registry, repository = DEFAULT_REGISTRY, name
    if registry == _LEGACY_DEFAULT_REGISTRY:
        registry = DEFAULT_REGISTRY
    if not _PATH_RE.match(repository):
        raise InvalidReference(text, f"malformed repository name {repository!r} "
                                     "(lower case letters, digits and . _ - separators only)")
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        if _FULL_HEX_ID_RE.match(repository):
            raise InvalidReference(text, "a 64-character hex string is an image id, not a name")
        repository = f"{_OFFICIAL_NAMESPACE}/{repository}"
    return registry, repository
