"""The one error table: every code maps to an HTTP status, a gRPC status and an OpenAI type."""

import grpc

from common.errors import ERRORS, ErrorCode, LlmlbError


def test_every_code_has_a_row() -> None:
    assert set(ERRORS) == set(ErrorCode)


def test_seed_codes_have_the_contract_statuses() -> None:
    expected = {
        ErrorCode.MODEL_NOT_FOUND: (404, grpc.StatusCode.NOT_FOUND),
        ErrorCode.INVALID_MODEL_ID: (400, grpc.StatusCode.INVALID_ARGUMENT),
        ErrorCode.DOWNLOAD_FAILED: (502, grpc.StatusCode.UNAVAILABLE),
        ErrorCode.NO_CAPABLE_NODES: (503, grpc.StatusCode.UNAVAILABLE),
        ErrorCode.QUEUE_FULL: (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ErrorCode.TIMEOUT: (504, grpc.StatusCode.DEADLINE_EXCEEDED),
        ErrorCode.UNAUTHORIZED: (401, grpc.StatusCode.UNAUTHENTICATED),
        ErrorCode.FORBIDDEN: (403, grpc.StatusCode.PERMISSION_DENIED),
    }
    for code, (http, status) in expected.items():
        assert (ERRORS[code].http_status, ERRORS[code].grpc_status) == (http, status), code


def test_openai_body_shape() -> None:
    body = LlmlbError(ErrorCode.MODEL_NOT_FOUND, "model 'x' not found").to_openai()
    assert body == {
        "error": {
            "message": "model 'x' not found",
            "type": "invalid_request_error",
            "code": "model_not_found",
            "param": None,
        }
    }
