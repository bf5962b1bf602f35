"""A store whose database goes away: one clear ``unavailable`` error, keys seen before keep working,
and everything works again once the database is back. On a real SQLite file whose directory is
moved away, so the store's next connection cannot open it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import grpc
import pytest
from sqlalchemy import exc as sa_exc

from balancer.auth import CACHE_SECONDS, TOUCH_EVERY_S, KeyRing
from balancer.http.errors import error_response
from balancer.store import Store, StoreUnavailable
from balancer.store.unavailable import is_unreachable
from common.errors import ErrorCode, LlmlbError
from common.types import ApiKey, CommandKind, Node, NodeState, Scope

UNREACHABLE = "the balancer's database is unreachable; try again"


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db_dir(tmp_path: Path) -> Path:
    return tmp_path / "db"


@pytest.fixture
async def store(db_dir: Path) -> AsyncIterator[Store]:
    url = f"sqlite+aiosqlite:///{db_dir / 'llmlb.db'}"
    opened = await Store.open(url)
    await opened.upsert_node(Node(id="n1", address="127.0.0.1:1", state=NodeState.OFFLINE))
    await opened.add_command("n1", CommandKind.DRAIN, "")
    yield opened
    await opened.close()


@asynccontextmanager
async def database_gone(store: Store, db_dir: Path) -> AsyncIterator[None]:
    """The database file cannot be opened (its directory is elsewhere) until the block ends.

    A database server that goes away takes its connections with it; a SQLite file has none to
    take, so the store's idle pooled connections are closed here to the same effect.
    """
    await store._engine.dispose()
    aside = db_dir.with_name("db-aside")
    os.rename(db_dir, aside)  # one metadata call, not worth a thread
    try:
        yield
    finally:
        os.rename(aside, db_dir)


def api_key(key_id: str) -> ApiKey:
    return ApiKey(id=key_id, name=key_id, prefix=key_id, secret_hash=f"hash-{key_id}", scopes=(Scope.API,))


async def test_reads_and_writes_fail_unavailable_while_the_database_is_gone_and_work_after(
    store: Store, db_dir: Path
) -> None:
    async with database_gone(store, db_dir):
        for call in (store.list_nodes(), store.pending_commands("n1"), store.add_key(api_key("k1"))):
            with pytest.raises(StoreUnavailable) as refused:
                await call
            assert refused.value.code is ErrorCode.UNAVAILABLE
            assert refused.value.message == UNREACHABLE
    # Back: the write that failed can be made now, and what was written before is all there.
    assert (await store.add_key(api_key("k1"))).id == "k1"
    assert [n.id for n in await store.list_nodes()] == ["n1"]
    assert [c.kind for c in await store.pending_commands("n1")] == [CommandKind.DRAIN]


async def test_a_request_error_is_not_mistaken_for_an_outage(store: Store) -> None:
    await store.add_key(api_key("k1"))
    with pytest.raises(ValueError, match="already stored"):
        await store.add_key(api_key("k1"))
    with pytest.raises(KeyError):
        await store.add_command("no-such-node", CommandKind.DRAIN, "")


def test_unavailable_is_a_503_with_retry_after_and_grpc_unavailable() -> None:
    error: LlmlbError = StoreUnavailable("ConnectionRefusedError(111)")
    assert error.spec.grpc_status is grpc.StatusCode.UNAVAILABLE
    response = error_response(error)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert error.to_openai()["error"] == {
        "message": UNREACHABLE,
        "type": "service_unavailable",
        "code": "unavailable",
        "param": None,
    }


async def test_a_key_seen_before_the_outage_keeps_working_and_a_new_one_is_unavailable(
    store: Store, db_dir: Path
) -> None:
    clock = FakeClock()
    keys = KeyRing(store, clock=clock)
    _, known = await keys.create("frontend", [Scope.API])
    _, never_used = await keys.create("batch", [Scope.API])
    assert await keys.check(known, Scope.API) is not None
    async with database_gone(store, db_dir):
        # Long past the cache, and time to record the key's use: only the store could answer now.
        clock.now += TOUCH_EVERY_S + CACHE_SECONDS
        checked = await keys.check(known, Scope.API)
        assert checked is not None and checked.name == "frontend"
        with pytest.raises(LlmlbError) as wrong_scope:  # the last answer still says what it may do
            await keys.check(known, Scope.ADMIN)
        assert wrong_scope.value.code is ErrorCode.FORBIDDEN
        with pytest.raises(LlmlbError) as unchecked:
            await keys.check(never_used, Scope.API)
        assert unchecked.value.code is ErrorCode.UNAVAILABLE
        with pytest.raises(LlmlbError) as write:
            await keys.create("during", [Scope.API])
        assert write.value.code is ErrorCode.UNAVAILABLE
        await keys.settle()  # a last-used write that failed is dropped, never raised
    assert await keys.check(never_used, Scope.API) is not None
    await keys.settle()
    assert {key.name for key in await keys.list()} == {"frontend", "batch"}


async def test_unknown_tokens_past_an_address_rate_are_refused_without_a_store_read(
    store: Store, db_dir: Path
) -> None:
    clock = FakeClock()
    keys = KeyRing(store, clock=clock, lookups_per_s=2)
    async with database_gone(store, db_dir):
        # A token that reaches the store is "unavailable" now; one refused before it is "unauthorized".
        for token in ("llmlb-a", "llmlb-b"):
            with pytest.raises(LlmlbError) as read:
                await keys.check(token, Scope.API, client="203.0.113.9")
            assert read.value.code is ErrorCode.UNAVAILABLE
        with pytest.raises(LlmlbError) as limited:
            await keys.check("llmlb-c", Scope.API, client="203.0.113.9")
        assert limited.value.code is ErrorCode.UNAUTHORIZED
        assert limited.value.spec.http_status == 401
        assert limited.value.retry_after_s == pytest.approx(0.5)
        assert "too many unknown API keys from this address" in limited.value.message
        with pytest.raises(LlmlbError) as elsewhere:  # another address has its own budget
            await keys.check("llmlb-c", Scope.API, client="198.51.100.4")
        assert elsewhere.value.code is ErrorCode.UNAVAILABLE
        clock.now += 0.5
        with pytest.raises(LlmlbError) as later:
            await keys.check("llmlb-c", Scope.API, client="203.0.113.9")
        assert later.value.code is ErrorCode.UNAVAILABLE


async def test_an_unknown_token_is_answered_from_memory_for_its_ttl_and_never_evicts_a_key(
    store: Store, db_dir: Path
) -> None:
    clock = FakeClock()
    keys = KeyRing(store, clock=clock, unknown_cache=3, unknown_ttl_s=30.0, lookups_per_s=1e9)
    _, known = await keys.create("frontend", [Scope.API])
    assert await keys.check(known, Scope.API) is not None
    for token in ("llmlb-0", "llmlb-1", "llmlb-2", "llmlb-3"):
        with pytest.raises(LlmlbError):
            await keys.check(token, Scope.API)
    async with database_gone(store, db_dir):
        clock.now += CACHE_SECONDS + 1
        for token in ("llmlb-1", "llmlb-2", "llmlb-3"):  # remembered: refused without a store read
            with pytest.raises(LlmlbError) as remembered:
                await keys.check(token, Scope.API)
            assert remembered.value.code is ErrorCode.UNAUTHORIZED
        with pytest.raises(LlmlbError) as forgotten:  # the oldest, past the bound: asked again
            await keys.check("llmlb-0", Scope.API)
        assert forgotten.value.code is ErrorCode.UNAVAILABLE
        checked = await keys.check(known, Scope.API)  # the key itself was never pushed out
        assert checked is not None and checked.name == "frontend"
        clock.now += 30.0
        with pytest.raises(LlmlbError) as expired:
            await keys.check("llmlb-1", Scope.API)
        assert expired.value.code is ErrorCode.UNAVAILABLE
    await keys.settle()


def wrapped(cause: BaseException) -> sa_exc.DBAPIError:
    """SQLAlchemy's wrapper around a driver error raised ``from cause``, as the asyncpg adapter raises it."""
    orig = Exception("driver error")
    orig.__cause__ = cause
    return sa_exc.DBAPIError("SELECT 1", {}, orig)


@pytest.mark.parametrize(
    ("error", "unreachable"),
    [
        (ConnectionRefusedError(111, "Connect call failed"), True),
        (TimeoutError(), True),  # a connect or statement timeout
        (sa_exc.TimeoutError("QueuePool limit reached"), True),  # no pooled connection came free
        (sa_exc.OperationalError("SELECT 1", {}, Exception("unable to open database file")), True),
        (sa_exc.DBAPIError("SELECT 1", {}, Exception("closed"), connection_invalidated=True), True),
        (wrapped(asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")), True),
        (wrapped(asyncpg.exceptions.CannotConnectNowError("the database system is starting up")), True),
        (sa_exc.IntegrityError("INSERT", {}, Exception("duplicate key")), False),
        (wrapped(asyncpg.exceptions.UniqueViolationError("duplicate key")), False),
        (ValueError("a request error"), False),
    ],
)
def test_only_errors_of_reaching_the_database_count_as_an_outage(
    error: BaseException, unreachable: bool
) -> None:
    assert is_unreachable(error) is unreachable
