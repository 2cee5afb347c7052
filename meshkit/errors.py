"""Errors as google.rpc.Status with an ErrorInfo, the one shape every service answers with.

Domain code raises :class:`DomainError` (or a subclass); the error interceptor in server.py turns
it into a gRPC status with ``details = [ErrorInfo{reason, domain, metadata}]``, which Envoy's
transcoder (``convert_grpc_status``) renders as JSON ``{code, message, details}``.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "ticketping.dev"


class DomainError(Exception):
    """A rule was broken; carries the gRPC code, an UPPER_SNAKE reason and a readable message."""

    code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        if code is not None:
            self.code = code
        self.metadata = dict(metadata or {})


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unimplemented(DomainError):
    code = grpc.StatusCode.UNIMPLEMENTED


# An error often repeats what the caller sent (a seat id, a name). It travels in the call's
# trailers, twice (grpc-message and the status details), and a 24,000-character seat id made them
# too large for the edge: a 502/503 instead of the 400 it was. Echoed text is cut to this.
MAX_ERROR_TEXT = 512


def clip(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def request_id_reused(request_id: object, used_for: str) -> InvalidArgument:
    """A request id names one request: the same id with other arguments is the client's mistake,
    not a retry (answering the first request's result would hide it)."""
    return InvalidArgument("REQUEST_ID_REUSED",
                           f"request id {request_id} was used for {used_for}; a new request needs a new id",
                           metadata={"request_id": str(request_id), "used_for": used_for})


def to_status(
    code: grpc.StatusCode, reason: str, message: str, metadata: dict[str, str] | None = None
) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN,
                                       metadata={k: clip(v) for k, v in (metadata or {}).items()})
    detail = any_pb2.Any()
    detail.Pack(info)
    st = status_pb2.Status(code=code.value[0], message=clip(message), details=[detail])
    return rpc_status.to_status(st)


def status_of(err: DomainError) -> grpc.Status:
    return to_status(err.code, err.reason, err.message, err.metadata)


async def abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    reason: str,
    message: str,
    **metadata: str,
) -> NoReturn:
    await context.abort_with_status(to_status(code, reason, message, metadata))
    raise AssertionError("unreachable: abort_with_status raises")


def error_info(err: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo inside a client-side error, if the server sent one (for tests and clients)."""
    st = rpc_status.from_call(err)  # type: ignore[arg-type]
    if st is None:
        return None
    for detail in st.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None
