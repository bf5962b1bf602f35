"""``/v0/keys``, ``/v0/me`` and ``/v0/usage``: API keys, who the caller is, and usage per key and model.

An ``admin`` key manages keys and reads anyone's usage; an ``api`` key reads only its own usage: asking
for another key's is refused, and asking for none answers with its own.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from balancer.auth import allows
from balancer.edge.caller import caller
from balancer.http import openai_answers as out
from balancer.http import openai_requests as cv
from balancer.http.route_table import Handlers
from balancer.http.schemas import CreateKeyBody, UpdateKeyBody
from balancer.parts import BalancerParts
from balancer.usage import window
from common.errors import ErrorCode, LlmlbError
from common.types import ApiKey, KeyLimits, Scope, UsageCount


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def key_json(key: ApiKey) -> dict[str, Any]:
    """A key as operators see it: never its secret or hash."""
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "scopes": [s.value for s in key.scopes],
        "created_at": _iso(key.created_at),
        "revoked_at": _iso(key.revoked_at),
        "last_used_at": _iso(key.last_used_at),
        "node_id": key.node_id,  # "" unless the key may register that one node id only
        "limits": limits_json(key.limits),
    }


def limits_json(limits: KeyLimits) -> dict[str, Any]:
    """A key's limits: 0 is no limit; an empty ``models``, every model."""
    return {
        "rpm": limits.rpm,
        "tpm": limits.tpm,
        "max_parallel": limits.max_parallel,
        "daily_tokens": limits.daily_tokens,
        "monthly_tokens": limits.monthly_tokens,
        "models": list(limits.models),
    }


def usage_json(count: UsageCount) -> dict[str, Any]:
    return {
        "key_id": count.key_id,
        "model": count.model,
        "minute": count.minute.isoformat(),
        "requests": count.requests,
        "errors": count.errors,
        "prompt_tokens": count.prompt_tokens,
        "completion_tokens": count.completion_tokens,
    }


def parse_since(value: str | None) -> datetime | None:
    """``since`` as ISO 8601 (with a zone, or UTC) or seconds since the epoch, in UTC; None when absent.

    A time no date can hold in UTC (``inf``, ``1e20``, year 9999 with an offset west of UTC) is refused
    here, naming ``since``, rather than overflowing later in the query.
    """
    if not value:
        return None
    try:
        seconds: float | None = float(value)
    except ValueError:
        seconds = None
    try:
        if seconds is not None:
            return datetime.fromtimestamp(seconds, UTC)
        at = datetime.fromisoformat(value)
    except ValueError:
        if seconds is None:
            raise LlmlbError(
                ErrorCode.INVALID_REQUEST,
                f"since must be an ISO 8601 time or seconds since the epoch; got {value[:64]!r}",
            ) from None
        raise _out_of_range(value) from None
    except (OverflowError, OSError):
        raise _out_of_range(value) from None
    try:
        return at.astimezone(UTC) if at.tzinfo is not None else at.replace(tzinfo=UTC)
    except OverflowError:
        raise _out_of_range(value) from None


def _out_of_range(value: str) -> LlmlbError:
    return LlmlbError(
        ErrorCode.INVALID_REQUEST,
        f"since is out of range: {value[:64]!r} is not a time between the years 1 and 9999 in UTC",
    )


def _scopes(names: list[str]) -> list[Scope]:
    try:
        return [Scope(name) for name in names]
    except ValueError:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, "each scope must be api, node or admin") from None


def key_routes(parts: BalancerParts) -> Handlers:
    """Keys (admin), the caller's own key (``/v0/me``) and usage (admin: any key; api: its own)."""

    def answer(payload: object, status: int = 200) -> Response:
        return Response(out.dumps(payload), status_code=status, media_type="application/json")

    async def list_keys(request: Request) -> Response:
        return answer({"object": "list", "data": [key_json(k) for k in await parts.keys.list()]})

    async def create_key(request: Request) -> Response:
        body = cv.parse_body(CreateKeyBody, await request.body())
        limits = KeyLimits(
            rpm=body.rpm,
            tpm=body.tpm,
            max_parallel=body.max_parallel,
            daily_tokens=body.daily_tokens,
            monthly_tokens=body.monthly_tokens,
            models=tuple(body.models),
        )
        key, secret = await parts.keys.create(
            body.name, _scopes(body.scopes), node_id=body.node_id, limits=limits
        )
        return answer({**key_json(key), "secret": secret}, 201)  # the only time the secret is shown

    async def update_key(request: Request) -> Response:
        body = cv.parse_body(UpdateKeyBody, await request.body())
        given = body.model_dump(exclude_none=True)
        limits = KeyLimits(**{**given, "models": tuple(given.get("models", ()))})
        return answer(key_json(await parts.keys.update(request.path_params["key"], limits, list(given))))

    async def revoke_key(request: Request) -> Response:
        return answer(key_json(await parts.keys.revoke(request.path_params["key"])))

    async def me(request: Request) -> Response:
        key = caller()
        if key is None:  # auth is off: every call is allowed, as if by an admin
            return answer({"id": "", "name": "", "scopes": [Scope.ADMIN.value], "replica": parts.replicas.id})
        return answer({**key_json(key), "replica": parts.replicas.id})

    async def usage(request: Request) -> Response:
        query = request.query_params
        key = caller()
        wanted = query.get("key") or None
        if key is not None and not allows(key, Scope.ADMIN):
            if wanted not in (None, key.id):
                raise LlmlbError(ErrorCode.FORBIDDEN, "an api key may read only its own usage")
            wanted = key.id
        since = window(parse_since(query.get("since")))
        model = (query.get("model") or "").lower() or None
        counts = await parts.usage.usage(since, key_id=wanted, model=model)
        return answer({"object": "list", "since": since.isoformat(), "data": [usage_json(c) for c in counts]})

    return {
        "keys": list_keys,
        "create_key": create_key,
        "revoke_key": revoke_key,
        "update_key": update_key,
        "me": me,
        "usage": usage,
    }
