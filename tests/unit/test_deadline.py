"""A request's deadline as the doors read it: ``X-Request-Timeout`` on HTTP, ``grpc-timeout`` on gRPC."""

from __future__ import annotations

import pytest

from balancer.edge.deadline import MAX_REQUEST_TIMEOUT_S, header_timeout, time_left
from common.errors import ErrorCode, LlmlbError


@pytest.mark.parametrize(
    ("raw", "seconds"), [(None, None), ("", None), ("2.5", 2.5), (" 30 ", 30.0), ("86400", 86400.0)]
)
def test_the_request_timeout_header_gives_seconds_or_none(raw: str | None, seconds: float | None):
    assert header_timeout(raw) == seconds


@pytest.mark.parametrize("raw", ["0", "-1", "soon", "nan", "inf", "1e9", str(MAX_REQUEST_TIMEOUT_S + 1)])
def test_a_request_timeout_header_that_is_no_usable_number_of_seconds_is_invalid(raw: str):
    with pytest.raises(LlmlbError) as refused:
        header_timeout(raw)
    assert refused.value.code is ErrorCode.INVALID_REQUEST
    assert "x-request-timeout" in refused.value.message


def test_a_grpc_deadline_already_passed_is_no_time_left_rather_than_none():
    assert time_left(None) is None  # the caller set no deadline: the router's default applies
    assert time_left(1.5) == 1.5
    assert time_left(-0.2) == 0.0  # passed: the router refuses instead of granting the default
