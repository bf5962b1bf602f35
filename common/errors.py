"""The one error vocabulary: each code with its HTTP status, gRPC status and OpenAI error type.

Nothing else invents error strings for clients: raise ``LlmlbError(ErrorCode.X, "message")`` and the
gRPC servicers and the HTTP shim translate it through ``ERRORS``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import grpc

from common.types import Capability


class ErrorCode(enum.StrEnum):
    INVALID_MODEL_ID = "invalid_model_id"
    INVALID_REQUEST = "invalid_request"
    MODEL_NOT_FOUND = "model_not_found"
    NODE_NOT_FOUND = "node_not_found"
    NODE_STOPPING = "node_stopping"  # a node shutting down: its drain cannot be undone
    KEY_NOT_FOUND = "key_not_found"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    ORIGIN_UNAUTHORIZED = "origin_unauthorized"
    ORIGIN_UNREACHABLE = "origin_unreachable"
    DOWNLOAD_FAILED = "download_failed"
    INSUFFICIENT_STORAGE = "insufficient_storage"
    NO_CAPABLE_NODES = "no_capable_nodes"
    QUEUE_FULL = "queue_full"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"  # the key's requests or tokens per minute, or in flight
    INSUFFICIENT_QUOTA = "insufficient_quota"  # the key's token budget for the day or month is spent
    TIMEOUT = "timeout"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    CANCELLED = "cancelled"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal_error"


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    http_status: int
    grpc_status: grpc.StatusCode
    openai_type: str


_S = grpc.StatusCode
ERRORS: dict[ErrorCode, ErrorSpec] = {
    ErrorCode.INVALID_MODEL_ID: ErrorSpec(400, _S.INVALID_ARGUMENT, "invalid_request_error"),
    ErrorCode.INVALID_REQUEST: ErrorSpec(400, _S.INVALID_ARGUMENT, "invalid_request_error"),
    ErrorCode.MODEL_NOT_FOUND: ErrorSpec(404, _S.NOT_FOUND, "invalid_request_error"),
    ErrorCode.NODE_NOT_FOUND: ErrorSpec(404, _S.NOT_FOUND, "invalid_request_error"),
    ErrorCode.KEY_NOT_FOUND: ErrorSpec(404, _S.NOT_FOUND, "invalid_request_error"),
    ErrorCode.NODE_STOPPING: ErrorSpec(409, _S.FAILED_PRECONDITION, "invalid_request_error"),
    ErrorCode.ORIGIN_NOT_ALLOWED: ErrorSpec(403, _S.PERMISSION_DENIED, "permission_error"),
    ErrorCode.ORIGIN_UNAUTHORIZED: ErrorSpec(403, _S.PERMISSION_DENIED, "permission_error"),
    ErrorCode.ORIGIN_UNREACHABLE: ErrorSpec(502, _S.UNAVAILABLE, "server_error"),
    ErrorCode.DOWNLOAD_FAILED: ErrorSpec(502, _S.UNAVAILABLE, "server_error"),
    ErrorCode.INSUFFICIENT_STORAGE: ErrorSpec(507, _S.RESOURCE_EXHAUSTED, "server_error"),
    ErrorCode.NO_CAPABLE_NODES: ErrorSpec(503, _S.UNAVAILABLE, "server_error"),
    ErrorCode.QUEUE_FULL: ErrorSpec(429, _S.RESOURCE_EXHAUSTED, "rate_limit_error"),
    # An API key's own limits (``balancer.edge.limits``), in the types OpenAI gives them.
    ErrorCode.RATE_LIMIT_EXCEEDED: ErrorSpec(429, _S.RESOURCE_EXHAUSTED, "rate_limit_exceeded"),
    ErrorCode.INSUFFICIENT_QUOTA: ErrorSpec(429, _S.RESOURCE_EXHAUSTED, "insufficient_quota"),
    ErrorCode.TIMEOUT: ErrorSpec(504, _S.DEADLINE_EXCEEDED, "timeout_error"),
    ErrorCode.UNAUTHORIZED: ErrorSpec(401, _S.UNAUTHENTICATED, "authentication_error"),
    ErrorCode.FORBIDDEN: ErrorSpec(403, _S.PERMISSION_DENIED, "permission_error"),
    ErrorCode.PAYLOAD_TOO_LARGE: ErrorSpec(413, _S.RESOURCE_EXHAUSTED, "invalid_request_error"),
    # An HTTP request line and headers over the ports' limit; gRPC has its own metadata limit.
    ErrorCode.HEADERS_TOO_LARGE: ErrorSpec(431, _S.RESOURCE_EXHAUSTED, "invalid_request_error"),
    ErrorCode.CANCELLED: ErrorSpec(499, _S.CANCELLED, "invalid_request_error"),
    # The balancer cannot reach what it depends on (its database): nothing wrong with the request.
    ErrorCode.UNAVAILABLE: ErrorSpec(503, _S.UNAVAILABLE, "service_unavailable"),
    ErrorCode.INTERNAL: ErrorSpec(500, _S.INTERNAL, "server_error"),
}

# gRPC trailing-metadata key that carries the stable machine code beside the status.
GRPC_CODE_KEY = "llmlb-error-code"
# gRPC trailing-metadata key with whole seconds to wait before retrying, as HTTP's ``Retry-After``.
GRPC_RETRY_AFTER_KEY = "retry-after"


class LlmlbError(Exception):
    """An error a client is meant to see: a stable code plus a human message."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retry_after_s: float | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        # Sent with the refusal: HTTP headers, gRPC trailing metadata (e.g. the key's rate limits).
        self.headers = headers

    @property
    def spec(self) -> ErrorSpec:
        return ERRORS[self.code]

    def to_openai(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI error body: ``{"error": {"message", "type", "code", "param"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.spec.openai_type,
                "code": self.code.value,
                "param": None,
            }
        }

    def retry_after(self) -> int | None:
        """Whole seconds, at least 1, to wait before retrying: always on 429, else when a wait is named.

        Both doors send it: HTTP as ``Retry-After``, gRPC in the ``retry-after`` trailer.
        """
        if self.retry_after_s is None and self.spec.http_status != 429:
            return None
        return max(1, math.ceil(self.retry_after_s or 1))

    def __repr__(self) -> str:
        return f"LlmlbError({self.code.value!r}, {self.message!r})"


def unknown_capabilities(got: object) -> LlmlbError:
    """The refusal of capabilities this build does not know, worded alike at both doors."""
    allowed = ", ".join(c.value for c in Capability)
    return LlmlbError(ErrorCode.INVALID_REQUEST, f"capabilities must be among {allowed}; got {got}")
