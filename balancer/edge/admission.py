"""Admitting an inference request: the checks every door makes before the router sees it.

The model id is put in its normal form (or refused with ``invalid_model_id``), a caller's request id must
follow one rule (or is refused; an absent one is minted), a ``prompt_cache_key`` (a routing hint the
balancer hashes and may remember) is at most ``MAX_PROMPT_CACHE_KEY_LENGTH`` characters, and the
request's own ``validate()`` applies the limits of ``common.inference`` (empty inputs, ranges, the speech
length cap). One function, both doors.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from typing import TypeVar

from common.errors import ErrorCode, LlmlbError
from common.inference import InferenceRequest
from common.model_id import normalize_model_id

MAX_REQUEST_ID_LENGTH = 128
REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_LENGTH}}}")
MAX_PROMPT_CACHE_KEY_LENGTH = 256


R = TypeVar("R", bound=InferenceRequest)


def check_request_id(given: str) -> str:
    """``given`` when it follows the rule, a fresh id when empty; ``invalid_request`` otherwise."""
    if not given:
        return uuid.uuid4().hex
    if REQUEST_ID.fullmatch(given) is None:
        shown = given if len(given) <= 40 else given[:37] + "..."
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST,
            f"request id {shown!r} must be 1 to {MAX_REQUEST_ID_LENGTH} letters, digits,"
            " '.', '_', ':' or '-'",
        )
    return given


def check_model(raw: str) -> str:
    """The normal form of the model a request names; a missing one is ``invalid_request``."""
    if not raw:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, "missing required parameter: 'model'")
    return normalize_model_id(raw)


def check_prompt_cache_key(given: str) -> None:
    """``invalid_request`` when ``given`` is longer than ``MAX_PROMPT_CACHE_KEY_LENGTH``."""
    if len(given) > MAX_PROMPT_CACHE_KEY_LENGTH:
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST,
            f"prompt_cache_key must be at most {MAX_PROMPT_CACHE_KEY_LENGTH} characters (got {len(given)})",
        )


def admit(request: R) -> R:
    """``request`` with its model id normalised and a request id, once it passes every check."""
    check_prompt_cache_key(getattr(request, "prompt_cache_key", ""))
    model = check_model(request.model)
    request_id = check_request_id(request.request_id)
    if model != request.model or request_id != request.request_id:
        request = replace(request, model=model, request_id=request_id)  # type: ignore[type-var]
    request.validate()
    return request
