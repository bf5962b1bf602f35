"""API keys with scopes: minting, checking bearer tokens, and the gRPC door's interceptor.

Only the sha256 of a secret is stored. Secrets are 32 random bytes, so a plain hash is enough (no
password stretching) and checking costs one hash plus, at most every few seconds, one store read.
Tokens the store does not hold are remembered apart and looked up at a bounded rate per client
address (``balancer.unknown_keys``).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import structlog

from balancer.changes import ChangeBus, KeyChanged, Resync
from balancer.edge.access import Access, grpc_access, unlisted
from balancer.edge.caller import set_caller
from balancer.store import Store, StoreUnavailable
from balancer.unknown_keys import LOOKUPS_PER_S, UNKNOWN_CACHE, UNKNOWN_TTL_S, LookupRate, UnknownTokens
from common.errors import GRPC_CODE_KEY, ErrorCode, LlmlbError
from common.model_id import normalize_model_id
from common.node_id import check_node_id
from common.rpc import OpenReads, abort_with, metadata_bearer, refusing_handler
from common.secret import Secret
from common.types import LIMIT_NAMES, NO_LIMITS, ApiKey, KeyLimits, Scope

log = structlog.get_logger(__name__)

SECRET_PREFIX = "llmlb-"
SHOWN_PREFIX_LENGTH = 12  # "llmlb-" and 6 more characters: enough to tell keys apart in a list
CACHE_SECONDS = 5.0  # a key revoked by another balancer process stops working within this long
TOUCH_EVERY_S = 60.0
SEEDED_ADMIN_NAME = "admin (LLMLB_ADMIN_KEY)"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# The store keeps each count as a signed 64-bit integer (and the gRPC message carries int64).
MAX_LIMIT = 2**63 - 1


def checked_limits(limits: KeyLimits) -> KeyLimits:
    """``limits`` with its models in normal form; ``invalid_request`` for a count out of range."""
    for name in LIMIT_NAMES[:-1]:
        if not 0 <= getattr(limits, name) <= MAX_LIMIT:
            raise LlmlbError(
                ErrorCode.INVALID_REQUEST, f"{name} must be 0 (no limit) or a whole number up to {MAX_LIMIT}"
            )
    models = tuple(dict.fromkeys(normalize_model_id(m) for m in limits.models))
    return replace(limits, models=models)


def allows(key: ApiKey, *scopes: Scope) -> bool:
    return Scope.ADMIN in key.scopes or any(s in key.scopes for s in scopes)


class KeyRing:
    """Mints, lists, revokes and checks API keys; ``enabled=False`` lets every call through.

    ``unknown_cache`` and ``unknown_ttl_s`` bound the memory of tokens the store does not hold;
    ``lookups_per_s`` is how many never-seen tokens one client address may have looked up a second.
    """

    def __init__(
        self,
        store: Store,
        *,
        enabled: bool = True,
        bus: ChangeBus | None = None,
        clock: Callable[[], float] = time.monotonic,
        unknown_cache: int = UNKNOWN_CACHE,
        unknown_ttl_s: float = UNKNOWN_TTL_S,
        lookups_per_s: float = LOOKUPS_PER_S,
    ) -> None:
        self._store = store
        self.enabled = enabled
        self._bus = bus if bus is not None else ChangeBus()  # alone: nothing travels
        # A key another replica created or revoked: every answer remembered here is asked again.
        self._bus.subscribe(KeyChanged, self._key_changed)
        self._bus.subscribe(Resync, self._key_changed)
        self._clock = clock  # monotonic seconds; injected where a test needs the cache to expire
        # secret hash -> (fresh until, key): only keys the store holds, so no caller can push one out
        self._cache: dict[str, tuple[float, ApiKey]] = {}
        self._unknown = UnknownTokens(unknown_cache, unknown_ttl_s)
        self._lookups = LookupRate(lookups_per_s)
        self._reading: dict[str, asyncio.Future[ApiKey | None]] = {}  # first reads under way, by digest
        self._touched: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Called with each key revoked here (``balancer.fleet.owners.Revocations.revoked``: the fleet
        # token rotates, the key's nodes are cut off).
        self.on_revoke: Callable[[ApiKey], Awaitable[None]] | None = None

    async def create(
        self, name: str, scopes: Sequence[Scope], *, node_id: str = "", limits: KeyLimits = NO_LIMITS
    ) -> tuple[ApiKey, str]:
        """A new key and its secret; the secret is returned here and never stored.

        ``node_id`` binds a ``node`` key to that one node id: it may register no other. ``limits``
        are applied at the edge (``balancer.edge.limits``).
        """
        limits = checked_limits(limits)
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
        stored = await self._add(name, scopes, secret, node_id, limits)
        await self._bus.publish(KeyChanged(stored.id))
        log.info(
            "key.created",
            key_id=stored.id,
            name=name,
            scopes=[s.value for s in stored.scopes],
            node_id=node_id or None,
        )
        return stored, secret

    async def _add(
        self,
        name: str,
        scopes: Sequence[Scope],
        secret: str,
        node_id: str = "",
        limits: KeyLimits = NO_LIMITS,
    ) -> ApiKey:
        """Stores a key with ``secret``; raises ValueError when a key with that secret is stored."""
        key = ApiKey(
            id=f"key-{secrets.token_hex(6)}",
            name=name,
            prefix=secret[:SHOWN_PREFIX_LENGTH],
            secret_hash=hash_secret(secret),
            scopes=tuple(dict.fromkeys(scopes)),
            node_id=node_id,
            limits=limits,
        )
        stored = await self._store.add_key(key)
        self._unknown.discard(key.secret_hash)
        return stored

    async def update(self, key_id_or_prefix: str, limits: KeyLimits, fields: Collection[str]) -> ApiKey:
        """Sets the limits named in ``fields`` (``LIMIT_NAMES``) of one key to those of ``limits``;
        0 (or no models) clears one. Every replica applies them within moments."""
        unknown = set(fields) - set(LIMIT_NAMES)
        if unknown or not fields:
            raise LlmlbError(
                ErrorCode.INVALID_REQUEST,
                f"name the limits to change among {', '.join(LIMIT_NAMES)}; got {sorted(fields)}",
            )
        found = [k for k in await self._store.list_keys() if key_id_or_prefix in (k.id, k.prefix)]
        if len(found) != 1:
            raise LlmlbError(ErrorCode.KEY_NOT_FOUND, f"no key {key_id_or_prefix!r}")
        new = checked_limits(replace(found[0].limits, **{f: getattr(limits, f) for f in fields}))
        stored = await self._store.set_key_limits(found[0].id, new)
        if stored is None:
            raise LlmlbError(ErrorCode.KEY_NOT_FOUND, f"no key {key_id_or_prefix!r}")
        self.forget()
        await self._bus.publish(KeyChanged(stored.id))
        log.info("key.limits_set", key_id=stored.id, limits=sorted(fields))
        return stored

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
        await self._bus.publish(KeyChanged(key_id_or_prefix))  # after the rotation: others re-read it
        if found is None:
            raise LlmlbError(ErrorCode.KEY_NOT_FOUND, f"no key {key_id_or_prefix!r}")
        return found

    async def _key_changed(self, _: KeyChanged | Resync) -> None:
        self.forget()

    def forget(self) -> None:
        """Makes every remembered answer stale, so the next check of each key asks the store again.

        Called on a revocation here and when another replica creates or revokes a key. The answers
        are kept, stale, for a store that cannot be reached meanwhile (see ``_lookup``); tokens
        remembered as unknown are forgotten, since one of them may be a key just created elsewhere.
        """
        self._cache = {digest: (0.0, key) for digest, (_, key) in self._cache.items()}
        self._unknown.clear()

    async def seed_admin(self, secret: Secret) -> ApiKey | None:
        """Stores ``secret`` (``LLMLB_ADMIN_KEY``) as an admin key unless a key with it is stored already.

        Idempotent across restarts and across replicas starting at once (the store refuses a second
        copy of one secret). A key with this secret that was revoked stays revoked: the operator's
        revocation wins over the setting. Returns the key created, None when none was.
        """
        if not self.enabled:
            return None
        found = await self._store.find_key(hash_secret(secret.reveal()))
        if found is None:
            try:
                stored = await self._add(SEEDED_ADMIN_NAME, [Scope.ADMIN], secret.reveal())
            except ValueError:  # another replica stored it in between
                return None
            await self._bus.publish(KeyChanged(stored.id))
            log.info("key.seeded", key_id=stored.id, name=SEEDED_ADMIN_NAME)
            return stored
        if found.revoked_at is not None:
            log.warning("key.seed_revoked", key_id=found.id)
        elif Scope.ADMIN not in found.scopes:
            log.warning("key.seed_not_admin", key_id=found.id, scopes=[s.value for s in found.scopes])
        return None

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

    async def authorize(
        self, token: str | None, access: Access | None, what: str, client: str = ""
    ) -> ApiKey | None:
        """The caller's key if ``access`` lets it in; refuses every caller when ``access`` is None.

        ``what`` names the call (a gRPC method, an HTTP route) in the refusal of an unlisted one;
        ``client`` is the caller's address (see ``check``).
        """
        if access is None:
            raise unlisted(what)
        if access.public:
            return None
        key = await self.check(token, *access.scopes, client=client)
        set_caller(key)  # the edge counts usage per key; some routes answer per key
        return key

    async def check(self, token: str | None, scope: Scope, *also: Scope, client: str = "") -> ApiKey | None:
        """The key behind ``token`` if it may act in ``scope`` (or one of ``also``); None when auth is off.

        Raises ``unauthorized`` (no, unknown or revoked key; or, with ``Retry-After``, a token never
        seen from a ``client`` address that had too many looked up this second) or ``forbidden`` (the
        key lacks the scope).
        """
        if not self.enabled:
            return None
        if not token:
            raise LlmlbError(
                ErrorCode.UNAUTHORIZED, "an API key is required: send 'Authorization: Bearer <key>'"
            )
        digest = hash_secret(token)
        now = self._clock()
        key = await self._lookup(digest, now, client)
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

    async def _lookup(self, digest: str, now: float, client: str) -> ApiKey | None:
        """The key stored under ``digest``, from the cache while it is fresh, else from the store.

        While the store cannot be reached the last answer it gave for this key stands, however old,
        so clients keep working through a database outage; a key never seen before cannot be
        checked and is refused as ``unavailable``, not as ``unauthorized``.

        A token the store does not hold is remembered apart (``UnknownTokens``), never in the key
        cache; a token never seen is looked up only within ``client``'s rate (``LookupRate``), and
        once however many requests bring it at the same moment (``_first_read``).
        """
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        if cached is None:
            if self._unknown.holds(digest, now):
                return None
            reading = self._reading.get(digest)
            if reading is None:
                wait = self._lookups.take(client, now)
                if wait > 0:
                    raise LlmlbError(
                        ErrorCode.UNAUTHORIZED,
                        "too many unknown API keys from this address; try again shortly",
                        retry_after_s=wait,
                    )
                reading = asyncio.ensure_future(self._first_read(digest, now, client))
                self._reading[digest] = reading
                reading.add_done_callback(lambda done: self._read_done(digest, done))
            # Shielded: one caller that goes away must not cancel the read the others wait on.
            return await asyncio.shield(reading)
        try:
            key = await self._store.find_key(digest)
        except StoreUnavailable:
            # Asked again only after another cache period, so an outage costs each key one failed
            # read every few seconds, not one per request.
            self._cache[digest] = (now + CACHE_SECONDS, cached[1])
            log.warning("key.checked_from_cache", key_id=cached[1].id)
            return cached[1]
        if key is None:
            self._cache.pop(digest, None)
            self._unknown.add(digest, now)
            return None
        self._cache[digest] = (now + CACHE_SECONDS, key)
        return key

    async def _first_read(self, digest: str, now: float, client: str) -> ApiKey | None:
        """The store's answer for a token never seen; raises ``StoreUnavailable`` while it is down."""
        key = await self._store.find_key(digest)
        if key is None:
            self._unknown.add(digest, now)
            return None
        self._lookups.give_back(client)  # a real key: only misses count against the address
        self._cache[digest] = (now + CACHE_SECONDS, key)
        return key

    def _read_done(self, digest: str, done: asyncio.Future[ApiKey | None]) -> None:
        if self._reading.get(digest) is done:
            del self._reading[digest]
        if not done.cancelled():
            done.exception()  # retrieved here: a failed read whose callers all left is not an error

    def needs_client(self, token: str | None, access: Access | None) -> bool:
        """Whether checking ``token`` for ``access`` may spend a lookup of the caller's address: a
        token neither known nor remembered as unknown (the gRPC door then checks it in the handler,
        where the address is known)."""
        if not self.enabled or access is None or access.public or not token:
            return False
        digest = hash_secret(token)
        return digest not in self._cache and not self._unknown.holds(digest, self._clock())

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
    """Checks each call against its method's entry in ``GRPC_ACCESS``; a method with none is refused.

    A refused call ends before its request is read; an open method's requests are read through
    ``OpenReads``, so callers without a key make the server hold little whatever they send.
    """

    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys
        self._open_reads = OpenReads()

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
        access = grpc_access(method)
        if self._keys.needs_client(token, access):
            # Only the handler's context knows the caller's address: check there, before the call runs.
            return checked_in_handler(handler, self._keys, token, access, method)
        try:
            await self._keys.authorize(token, access, method)
        except LlmlbError as exc:
            return _refused(handler, method, exc)
        if access is not None and access.public:
            return self._open_reads.guard(handler)
        return handler


def peer_host(peer: str) -> str:
    """The address of a gRPC peer without its port: ``ipv4:10.0.0.7:5123`` and ``ipv6:[::1]:5123``
    give ``10.0.0.7`` and ``::1``; anything else (``unix:...``) is kept whole."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0] or rest
        return host.removeprefix("[").removesuffix("]")
    return peer


def _refused(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, exc: LlmlbError
) -> grpc.RpcMethodHandler[Any, Any]:
    log.info("auth.refused", method=method, code=exc.code.value)
    trailing = ((GRPC_CODE_KEY, exc.code.value),)
    return refusing_handler(handler, exc.spec.grpc_status, exc.message, trailing)


def checked_in_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    keys: KeyRing,
    token: str | None,
    access: Access | None,
    method: str,
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with the key check first, made with the caller's address from ``context.peer()``.

    The wrapped handler takes its request as a stream whatever ``handler`` takes, and reads it only after
    the check: gRPC reads a unary request whole before its handler runs, so a caller with a made-up key
    could otherwise make the server hold a message up to the limit before being refused.
    """

    async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            await keys.authorize(token, access, method, peer_host(context.peer()))
        except LlmlbError as exc:
            log.info("auth.refused", method=method, code=exc.code.value)
            await abort_with(context, exc)

    async def request(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """The call itself, started once the check has passed: a response, a coroutine or a generator."""
        await check(context)
        if handler.request_streaming:
            behaviour = cast(Callable[..., Any], handler.stream_stream or handler.stream_unary)
            return behaviour(requests, context)
        first = await anext(requests, None)
        if first is None:
            await abort_with(context, LlmlbError(ErrorCode.INVALID_REQUEST, "no request message"))
        behaviour = cast(Callable[..., Any], handler.unary_stream or handler.unary_unary)
        return behaviour(first, context)

    async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await (await request(requests, context))

    async def streaming(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        answer = await request(requests, context)
        if inspect.isasyncgen(answer):
            async for item in answer:
                yield item
        else:  # a handler that writes through the context
            await answer

    shapes: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **shapes)
    return grpc.stream_unary_rpc_method_handler(unary, **shapes)
