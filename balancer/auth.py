"""API keys with scopes: minting, checking bearer tokens, and the gRPC door's interceptor.

Only the sha256 of a secret is stored. Secrets are 32 random bytes, so a plain hash is enough (no
password stretching) and checking costs one hash plus, at most every few seconds, one store read.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import structlog

from balancer.changes import NO_CHANGES, Change, Changes
from balancer.edge.access import Access, grpc_access, unlisted
from balancer.edge.caller import set_caller
from balancer.store import Store, StoreUnavailable
from common.errors import GRPC_CODE_KEY, ErrorCode, LlmlbError
from common.node_id import check_node_id
from common.rpc import metadata_bearer, refusing_handler
from common.types import ApiKey, Scope

log = structlog.get_logger(__name__)

SECRET_PREFIX = "llmlb-"
SHOWN_PREFIX_LENGTH = 12  # "llmlb-" and 6 more characters: enough to tell keys apart in a list
CACHE_SECONDS = 5.0  # a key revoked by another balancer process stops working within this long
TOUCH_EVERY_S = 60.0


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def allows(key: ApiKey, *scopes: Scope) -> bool:
    return Scope.ADMIN in key.scopes or any(s in key.scopes for s in scopes)


class KeyRing:
    """Mints, lists, revokes and checks API keys; ``enabled=False`` lets every call through."""

    def __init__(
        self,
        store: Store,
        *,
        enabled: bool = True,
        changes: Changes = NO_CHANGES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.enabled = enabled
        self._changes = changes
        self._clock = clock  # monotonic seconds; injected where a test needs the cache to expire
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}  # secret hash -> (expires, key)
        self._touched: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Called with each key revoked here (``balancer.node_owners.revoked``: the fleet token rotates,
        # the key's nodes are cut off).
        self.on_revoke: Callable[[ApiKey], Awaitable[None]] | None = None

    async def create(self, name: str, scopes: Sequence[Scope], *, node_id: str = "") -> tuple[ApiKey, str]:
        """A new key and its secret; the secret is returned here and never stored.

        ``node_id`` binds a ``node`` key to that one node id: it may register no other.
        """
        if not scopes:
            raise LlmlbError(ErrorCode.INVALID_REQUEST, "a key needs at least one scope (api, node, admin)")
        if len(name) > 128:
            raise LlmlbError(ErrorCode.INVALID_REQUEST, "a key name has at most 128 characters")
        if node_id:
            check_node_id(node_id)
            if Scope.NODE not in scopes or Scope.ADMIN in scopes:
                raise LlmlbError(
                    ErrorCode.INVALID_REQUEST, "only a node key (without admin) is bound to a node id"
                )
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            id=f"key-{secrets.token_hex(6)}",
            name=name,
            prefix=secret[:SHOWN_PREFIX_LENGTH],
            secret_hash=hash_secret(secret),
            scopes=tuple(dict.fromkeys(scopes)),
            node_id=node_id,
        )
        stored = await self._store.add_key(key)
        await self._changes.publish(Change.KEY, stored.id)
        log.info(
            "key.created",
            key_id=stored.id,
            name=name,
            scopes=[s.value for s in stored.scopes],
            node_id=node_id or None,
        )
        return stored, secret

    async def list(self) -> list[ApiKey]:
        return await self._store.list_keys()

    async def revoke(self, key_id_or_prefix: str) -> ApiKey:
        """Revokes one live key by id or shown prefix; it stops working in this process at once."""
        try:
            revoked = await self._store.revoke_key(key_id_or_prefix)
        except ValueError as exc:
            raise LlmlbError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        if not revoked:
            raise LlmlbError(ErrorCode.KEY_NOT_FOUND, f"no live key {key_id_or_prefix!r}")
        self.forget()
        found = None
        for key in await self._store.list_keys():
            if key_id_or_prefix in (key.id, key.prefix) and key.revoked_at is not None:
                found = key
                break
        if found is not None and self.on_revoke is not None:
            await self.on_revoke(found)
        await self._changes.publish(Change.KEY, key_id_or_prefix)  # after the rotation: others re-read it
        if found is None:
            raise LlmlbError(ErrorCode.KEY_NOT_FOUND, f"no key {key_id_or_prefix!r}")
        return found

    def forget(self) -> None:
        """Makes every remembered answer stale, so the next check of each key asks the store again.

        Called on a revocation here and when another replica creates or revokes a key. The answers
        are kept, stale, for a store that cannot be reached meanwhile (see ``_lookup``).
        """
        self._cache = {digest: (0.0, key) for digest, (_, key) in self._cache.items()}

    async def bootstrap(self, path: Path) -> str | None:
        """On a store with no keys, mints the first admin key and writes it to ``path`` (mode 0600).

        Returns the secret so the caller can show it once; None when keys exist or auth is off.
        """
        if not self.enabled or await self._store.count_keys():
            return None
        key, secret = await self.create("admin", [Scope.ADMIN])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a file left there earlier keeps its mode through O_CREAT
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.replace(tmp, path)
        log.info("key.bootstrapped", key_id=key.id, file=str(path))
        return secret

    async def authorize(self, token: str | None, access: Access | None, what: str) -> ApiKey | None:
        """The caller's key if ``access`` lets it in; refuses every caller when ``access`` is None.

        ``what`` names the call (a gRPC method, an HTTP route) in the refusal of an unlisted one.
        """
        if access is None:
            raise unlisted(what)
        if access.public:
            return None
        key = await self.check(token, *access.scopes)
        set_caller(key)  # the edge counts usage per key; some routes answer per key
        return key

    async def check(self, token: str | None, scope: Scope, *also: Scope) -> ApiKey | None:
        """The key behind ``token`` if it may act in ``scope`` (or one of ``also``); None when auth is off.

        Raises ``unauthorized`` (no, unknown or revoked key) or ``forbidden`` (the key lacks the scope).
        """
        if not self.enabled:
            return None
        if not token:
            raise LlmlbError(
                ErrorCode.UNAUTHORIZED, "an API key is required: send 'Authorization: Bearer <key>'"
            )
        digest = hash_secret(token)
        now = self._clock()
        key = await self._lookup(digest, now)
        if key is None or key.revoked_at is not None:
            raise LlmlbError(ErrorCode.UNAUTHORIZED, "invalid or revoked API key")
        if not allows(key, scope, *also):
            have = ", ".join(s.value for s in key.scopes)
            raise LlmlbError(ErrorCode.FORBIDDEN, f"this key has scope {have}; this call needs {scope.value}")
        if now - self._touched.get(key.id, 0.0) > TOUCH_EVERY_S:
            self._touched[key.id] = now
            task = asyncio.create_task(self._touch(key.id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return key

    async def _lookup(self, digest: str, now: float) -> ApiKey | None:
        """The key stored under ``digest``, from the cache while it is fresh, else from the store.

        While the store cannot be reached the last answer it gave for this key stands, however old,
        so clients keep working through a database outage; a key never seen before cannot be
        checked and is refused as ``unavailable``, not as ``unauthorized``.
        """
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            key = await self._store.find_key(digest)
        except StoreUnavailable:
            if cached is None:
                raise
            # Asked again only after another cache period, so an outage costs each key one failed
            # read every few seconds, not one per request.
            self._cache[digest] = (now + CACHE_SECONDS, cached[1])
            log.warning("key.checked_from_cache", key_id=cached[1].id if cached[1] else None)
            return cached[1]
        if len(self._cache) > 10_000:  # unknown tokens must not grow memory without bound
            self._cache.clear()
        self._cache[digest] = (now + CACHE_SECONDS, key)
        return key

    async def settle(self) -> None:
        """Waits for the last-used writes still in flight, so the store can close under none of them."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _touch(self, key_id: str) -> None:
        try:
            await self._store.touch_key(key_id, datetime.now(UTC))
        except Exception as exc:  # bookkeeping only: a failed write must not fail a request
            log.warning("key.touch_failed", key_id=key_id, error=repr(exc))


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks each call against its method's entry in ``GRPC_ACCESS``; a method with none is refused."""

    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # not served at all: gRPC answers UNIMPLEMENTED
            return handler
        method = handler_call_details.method
        token = metadata_bearer(handler_call_details.invocation_metadata)
        try:
            await self._keys.authorize(token, grpc_access(method), method)
        except LlmlbError as exc:
            log.info("auth.refused", method=method, code=exc.code.value)
            trailing = ((GRPC_CODE_KEY, exc.code.value),)
            return refusing_handler(handler, exc.spec.grpc_status, exc.message, trailing)
        return handler
