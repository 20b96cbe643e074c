"""Errors of the image side, each carrying enough context to act on without a traceback.

No gRPC here: the daemon's server maps these classes to status codes in one table
(pyshim/server/servicer.py STATUS_CODES: ImageNotFound NOT_FOUND, InvalidReference
INVALID_ARGUMENT, RegistryError UNAVAILABLE, the rest INTERNAL), so the class says *what kind* of
failure and the fields say *which* image, registry or layer member it was about.
"""
from __future__ import annotations


class ImageError(Exception):
    """Base of every failure raised by the oci package."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ImageNotFound(ImageError):
    def __init__(self, image: str, detail: str = ""):
        self.image = image
        self.detail = detail
        super().__init__(f"image {image!r} not found" + (f": {detail}" if detail else ""))


class InvalidReference(ImageError):
    def __init__(self, reference: str, reason: str):
        self.reference = reference
        self.reason = reason
        super().__init__(f"invalid image reference {reference!r}: {reason}")


class DigestMismatch(ImageError):
    def __init__(self, what: str, expected: str, actual: str):
        self.what = what
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what} does not match: expected {expected}, got {actual}")


class RegistryError(ImageError):
    """A registry conversation went wrong; `step` says which request (e.g. "fetch manifest")."""

    def __init__(self, registry: str, repository: str, step: str,
                 status: int | None = None, detail: str = ""):
        self.registry = registry
        self.repository = repository
        self.step = step
        self.status = status
        self.detail = detail
        where = f"registry {registry}, repository {repository}"
        code = f" (HTTP {status})" if status is not None else ""
        super().__init__(f"{step} failed at {where}{code}" + (f": {detail}" if detail else ""))


class UnsafeLayer(ImageError):
    """A layer (or checkpoint diff) member that would write outside its destination."""

    def __init__(self, member: str, reason: str, layer: str = ""):
        self.member = member
        self.reason = reason
        self.layer = layer
        src = f" in layer {layer}" if layer else ""
        super().__init__(f"refusing member {member!r}{src}: {reason}")
