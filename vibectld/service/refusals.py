"""Refusals of a call, and the one place they become gRPC status codes.

Failures of the call itself (who is asking, what they may do, how much) are
gRPC statuses; failures of the model are reported in-band (see providers/execution.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import grpc


class CallRefused(Exception):
    """The server will not serve this call."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, trailers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.trailers = tuple(trailers)

    @property
    def reason(self) -> str:
        """The refusal's label in the metrics: the status, or which limit."""
        return str(self.code.name).lower()


class Unauthenticated(CallRefused):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CallRefused):
    code = grpc.StatusCode.PERMISSION_DENIED


class InvalidRequest(CallRefused):
    code = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceeded(CallRefused):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, limit_type: str, retry_after_ms: int) -> None:
        super().__init__(
            message, (("limit-type", limit_type), ("retry-after-ms", str(retry_after_ms)))
        )
        self.limit_type = limit_type
        self.retry_after_ms = retry_after_ms

    @property
    def reason(self) -> str:
        return self.limit_type


class Unavailable(CallRefused):
    code = grpc.StatusCode.UNAVAILABLE


async def abort(context: Any, refusal: CallRefused) -> NoReturn:
    """End the call with the refusal's status, message and trailing metadata."""
    if refusal.trailers:
        context.set_trailing_metadata(refusal.trailers)
    await context.abort(refusal.code, refusal.message)
    raise AssertionError("context.abort returned")  # pragma: no cover
