"""Errors that carry the gRPC status code a CRI client should see.

Managers raise these; the servicer layer turns them into gRPC statuses. Anything else
that escapes becomes INTERNAL with its message, so nothing is swallowed silently.
"""
import grpc


class CRIError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFound(CRIError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(CRIError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class AlreadyExists(CRIError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CRIError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(CRIError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(CRIError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(CRIError):
    code = grpc.StatusCode.INTERNAL
