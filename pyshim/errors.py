"""pyshim's domain errors: what kind of failure, with a message that says what and where.

Managers and adapters raise these; they know nothing of gRPC. The server boundary
(pyshim/server/servicer.py, `status_of`) is the one place that maps each class to the status
code a CRI client sees. Anything else that escapes becomes INTERNAL with its message, so
nothing is swallowed silently.
"""


class CRIError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFound(CRIError):
    """The named pod, container or image does not exist."""


class InvalidArgument(CRIError):
    """The request itself is wrong; repeating it unchanged fails again."""


class AlreadyExists(CRIError):
    """What the request would create exists already."""


class FailedPrecondition(CRIError):
    """The request is fine but the object or the node is not in a state to do it."""


class DeadlineExceeded(CRIError):
    """The caller's deadline (or the request's own timeout) passed before the work finished."""


class Unavailable(CRIError):
    """A dependency is temporarily unable to serve: retrying later may succeed."""


class Unimplemented(CRIError):
    """pyshim does not offer this."""


class Internal(CRIError):
    """pyshim or a tool it runs failed in a way the caller cannot fix."""
