"""Exceptions raised by the taskmaster library: each carries the gRPC status and the master's message."""

from __future__ import annotations

from typing import Dict, Optional, Type

import grpc


class TaskmasterError(Exception):
    """A call to the master failed. `code` is the gRPC status code, `message` what the master said."""

    def __init__(self, code: grpc.StatusCode, message: str, address: str = "") -> None:
        self.code = code
        self.message = message
        self.address = address
        super().__init__(f"{code.name}: {message}")


class InvalidArgument(TaskmasterError):
    """The request was malformed or out of bounds (a payload too large, an unknown queue name...)."""


class Unauthenticated(TaskmasterError):
    """The master refused the token: check token_file or TASKMASTER_TOKEN."""


class PermissionDenied(TaskmasterError):
    """The token is valid but may not do this (a worker-only token submitting, say)."""


class NotFound(TaskmasterError):
    """No such task or job: never submitted, or past the master's result retention."""


class AlreadyExists(TaskmasterError):
    """An idempotency key was used before for different work."""


class FailedPrecondition(TaskmasterError):
    """The request does not fit the state it names (appending to a closed job, say)."""


class ResourceExhausted(TaskmasterError):
    """A queue or tenant limit was hit: retry later."""


class Unavailable(TaskmasterError):
    """The master could not be reached, or cannot store new work now: retry later."""


class DeadlineExceeded(TaskmasterError):
    """The master did not answer in time."""


class Aborted(TaskmasterError):
    """A conflicting operation is under way (the same key still being stored): retry."""


class Cancelled(TaskmasterError):
    """The call was cancelled on this side."""


_BY_CODE: Dict[grpc.StatusCode, Type[TaskmasterError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def error_for(code: grpc.StatusCode, message: str, address: str = "") -> TaskmasterError:
    """The exception for a status: its subclass when there is one, TaskmasterError otherwise."""
    return _BY_CODE.get(code, TaskmasterError)(code, message, address)


def from_rpc_error(error: grpc.RpcError, address: str = "") -> TaskmasterError:
    """Translates a failed gRPC call into the exception a user can act on."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    details: Optional[str] = error.details()  # type: ignore[attr-defined]
    message = details or code.name
    if code == grpc.StatusCode.UNAUTHENTICATED:
        message = f"the master refused the token ({message}): check token_file or TASKMASTER_TOKEN"
    elif code == grpc.StatusCode.UNAVAILABLE and not _answered_by_master(error):
        message = f"cannot reach the master at {address}: {message}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the master at {address} did not answer in time"
    return error_for(code, message, address)


def _answered_by_master(error: grpc.RpcError) -> bool:
    # The master marks its own answers, so its "disk full" is told apart from "no route".
    trailing = getattr(error, "trailing_metadata", None)
    try:
        metadata = trailing() if callable(trailing) else None
    except Exception:  # an aio error before any answer has no metadata to give
        metadata = None
    return any(key == ANSWERED_BY_MASTER for key, _ in (metadata or ()))


# Trailing metadata key the master puts on its own answers (common/grpc_util.h, kAnsweredByMaster).
ANSWERED_BY_MASTER = "tm-answered"
