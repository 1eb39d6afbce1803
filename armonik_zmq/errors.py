"""Exceptions the client raises, one class per ``ErrorCode`` of an error reply."""

from __future__ import annotations

from .protocol import ErrorCode


class ArmoniKZmqError(Exception):
    """Base class: an error reply from the broker (``code`` + ``message``) or a transport failure."""

    code: ErrorCode = ErrorCode.UNKNOWN

    def __init__(self, message: str, code: ErrorCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = ErrorCode(code)

    def __str__(self) -> str:
        return f"[{self.code.name}] {self.message}"


class InvalidArgumentError(ArmoniKZmqError, ValueError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFoundError(ArmoniKZmqError, KeyError):
    code = ErrorCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would repr() the message
        return ArmoniKZmqError.__str__(self)


class FailedPreconditionError(ArmoniKZmqError):
    code = ErrorCode.FAILED_PRECONDITION


class AbortedError(ArmoniKZmqError):
    code = ErrorCode.ABORTED


class PermissionDeniedError(ArmoniKZmqError):
    code = ErrorCode.PERMISSION_DENIED


class ResourceExhaustedError(ArmoniKZmqError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class UnimplementedError(ArmoniKZmqError):
    code = ErrorCode.UNIMPLEMENTED


class MalformedError(ArmoniKZmqError):
    code = ErrorCode.MALFORMED


class StaleAttemptError(ArmoniKZmqError):
    code = ErrorCode.STALE_ATTEMPT


class StorageFullError(ResourceExhaustedError):
    """The broker's storage is full (its LMDB map is at ``--max-map-size``): nothing was applied."""

    code = ErrorCode.STORAGE_FULL


class DataCorruptError(ArmoniKZmqError):
    """Shared-memory data that does not match the checksum recorded with it: never returned, always raised."""
    code = ErrorCode.DATA_CORRUPT


class BrokerUnavailableError(ArmoniKZmqError, TimeoutError):
    """The broker did not answer in time (not running, wrong endpoint, or overloaded)."""

    code = ErrorCode.UNAVAILABLE


class ConnectionLostError(BrokerUnavailableError):
    """The connection to the broker dropped: the broker forgot this client's subscriptions."""


class AuthenticationError(BrokerUnavailableError):
    """The broker refused this connection's CURVE handshake (unknown key, wrong server key, or no keys given)."""

    code = ErrorCode.UNAUTHENTICATED


_BY_CODE = {cls.code: cls for cls in (
    InvalidArgumentError, NotFoundError, FailedPreconditionError, AbortedError, PermissionDeniedError,
    ResourceExhaustedError, UnimplementedError, MalformedError, StaleAttemptError, BrokerUnavailableError,
)}


_BY_CODE[ErrorCode.STORAGE_FULL] = StorageFullError


def from_error(code: int, message: str) -> ArmoniKZmqError:
    """Build the exception of an error reply."""
    try:
        code = ErrorCode(code)
    except ValueError:
        code = ErrorCode.UNKNOWN
    return _BY_CODE.get(code, ArmoniKZmqError)(message, code)


class TaskFailedError(RuntimeError):
    """A task of the futures API ended without a value of its own (not an exception its function raised)."""

    def __init__(self, message: str, task_id: str = "", status_message: str = ""):
        super().__init__(message)
        self.task_id = task_id
        self.status_message = status_message


class TaskCancelledError(TaskFailedError):
    """The task was cancelled on the broker (by another client, its session, or a failed dependency)."""


class TaskTimeoutError(TaskFailedError, TimeoutError):
    """The task ran past its max_duration."""


class WorkerLostError(TaskFailedError):
    """The task's worker process died on every attempt the task had."""
