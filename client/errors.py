"""Typed errors for gRPC failures: each keeps the status code and the server's message."""

from __future__ import annotations

from typing import Any

import grpc


class ClipsearchError(Exception):
    """A call to a clipsearch service failed; `.code` is the gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(ClipsearchError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ItemsFailed(InvalidArgument):
    """Some items of a call were bad; `.failures` maps their index to the reason.
    The other items were fine (a bad item never fails its neighbours)."""

    def __init__(self, failures: dict[int, str]) -> None:
        self.failures = failures
        shown = "; ".join(failures.values())
        super().__init__(f"{len(failures)} item(s) failed: {shown}")


class Unavailable(ClipsearchError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ClipsearchError):
    """Over a limit. `.retry_after_s`: the service's hint (its `retry-after-ms` trailing
    metadata, sent for per-caller rate and concurrency limits), or None."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after_s: float | None = None


class DeadlineExceeded(ClipsearchError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(ClipsearchError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ClipsearchError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(ClipsearchError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(ClipsearchError):
    code = grpc.StatusCode.NOT_FOUND


_BY_CODE: dict[grpc.StatusCode, type[ClipsearchError]] = {
    cls.code: cls for cls in (InvalidArgument, Unavailable, ResourceExhausted, DeadlineExceeded,
                              PermissionDenied, Unauthenticated, FailedPrecondition, NotFound)}


def from_rpc_error(error: grpc.RpcError) -> ClipsearchError:
    """The typed error for a failed call (ClipsearchError itself for other codes)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code, ClipsearchError)
    if code == grpc.StatusCode.UNAVAILABLE and "backend unhealthy" in (details or ""):
        # The channel's health checking held the call back: no address reports SERVING.
        details = (f"no server at this address reports SERVING yet (still loading its "
                   f"model, or stopping): {details}")
    typed = cls(details or code.name, code)
    if isinstance(typed, ResourceExhausted):
        typed.retry_after_s = _retry_after_s(error)
    return typed


def _retry_after_s(error: grpc.RpcError) -> float | None:
    trailing: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == "retry-after-ms":
            try:
                return int(str(value)) / 1000
            except (TypeError, ValueError):
                return None
    return None
