"""API keys on a real store, SQLite and PostgreSQL: minting, checking scopes, revoking, the admin key."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from balancer.auth import KeyRing
from balancer.edge.access import grpc_access
from balancer.store import Store
from common import converters
from common.errors import ErrorCode, LlmlbError
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import bearer
from common.secret import Secret
from common.types import ApiKey, Scope


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(database_url)
    yield opened
    await opened.close()


@pytest.fixture
async def keys(store: Store) -> AsyncIterator[KeyRing]:
    ring = KeyRing(store)
    yield ring
    await ring.settle()  # a check records the key's last use in the background: let it land first


async def refused(keys: KeyRing, token: str | None, scope: Scope) -> ErrorCode:
    with pytest.raises(LlmlbError) as info:
        await keys.check(token, scope)
    return info.value.code


async def test_a_new_key_passes_its_own_scope_and_is_forbidden_others(keys: KeyRing) -> None:
    key, secret = await keys.create("chat-frontend", [Scope.API])
    assert secret.startswith("llmlb-") and secret.startswith(key.prefix)
    checked = await keys.check(secret, Scope.API)
    assert checked is not None and checked.id == key.id
    assert await refused(keys, secret, Scope.NODE) is ErrorCode.FORBIDDEN
    assert await refused(keys, secret, Scope.ADMIN) is ErrorCode.FORBIDDEN


async def test_missing_and_unknown_keys_are_unauthorized(keys: KeyRing) -> None:
    await keys.create("some", [Scope.API])
    assert await refused(keys, None, Scope.API) is ErrorCode.UNAUTHORIZED
    assert await refused(keys, "", Scope.API) is ErrorCode.UNAUTHORIZED
    assert await refused(keys, "llmlb-not-a-key", Scope.API) is ErrorCode.UNAUTHORIZED


async def test_new_keys_from_one_address_pass_and_only_unknown_tokens_spend_its_rate(store: Store) -> None:
    keys = KeyRing(store, lookups_per_s=1)
    minted = [(await keys.create(f"client-{i}", [Scope.API]))[1] for i in range(5)]
    for secret in minted:  # each a store read, each found: the address keeps its budget
        assert await keys.check(secret, Scope.API, client="192.0.2.1") is not None
    with pytest.raises(LlmlbError) as unknown:
        await keys.check("llmlb-not-a-key", Scope.API, client="192.0.2.1")
    assert unknown.value.message == "invalid or revoked API key"
    with pytest.raises(LlmlbError) as again:  # remembered: refused the same way, no read, no budget
        await keys.check("llmlb-not-a-key", Scope.API, client="192.0.2.1")
    assert again.value.message == "invalid or revoked API key"
    with pytest.raises(LlmlbError) as limited:
        await keys.check("llmlb-another-guess", Scope.API, client="192.0.2.1")
    assert limited.value.code is ErrorCode.UNAUTHORIZED and limited.value.retry_after_s is not None
    await keys.settle()


async def test_a_new_key_used_by_many_requests_at_once_is_read_once_and_passes_every_one(
    store: Store,
) -> None:
    keys = KeyRing(store, lookups_per_s=1)
    _, secret = await keys.create("busy-client", [Scope.API])
    checked = await asyncio.gather(*(keys.check(secret, Scope.API, client="192.0.2.1") for _ in range(50)))
    assert all(key is not None and key.name == "busy-client" for key in checked)
    await keys.settle()


async def test_a_revoked_key_stops_working_at_once(keys: KeyRing) -> None:
    key, secret = await keys.create("leaked", [Scope.NODE])
    await keys.check(secret, Scope.NODE)  # now cached as good
    revoked = await keys.revoke(key.prefix)
    assert revoked.id == key.id and revoked.revoked_at is not None
    assert await refused(keys, secret, Scope.NODE) is ErrorCode.UNAUTHORIZED
    with pytest.raises(LlmlbError) as again:
        await keys.revoke(key.id)
    assert again.value.code is ErrorCode.KEY_NOT_FOUND


async def test_an_admin_key_passes_every_scope(keys: KeyRing) -> None:
    _, secret = await keys.create("ops", [Scope.ADMIN])
    for scope in Scope:
        assert await keys.check(secret, scope) is not None


async def test_a_key_needs_a_scope(store: Store) -> None:
    with pytest.raises(LlmlbError) as info:
        await KeyRing(store).create("nothing", [])
    assert info.value.code is ErrorCode.INVALID_REQUEST


async def test_with_auth_off_any_caller_passes(store: Store) -> None:
    assert await KeyRing(store, enabled=False).check(None, Scope.ADMIN) is None


async def test_bootstrap_writes_one_private_admin_key_on_the_first_start_only(
    tmp_path: Path, database_url: str, store: Store
) -> None:
    path = tmp_path / "home" / "admin-key"
    secret = await KeyRing(store).bootstrap(path)
    assert secret is not None
    assert path.read_text().strip() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = KeyRing(store)
    assert await ring.check(secret, Scope.ADMIN) is not None
    await ring.settle()
    assert (await ring.list())[0].last_used_at is not None  # the use was recorded before the close

    await store.close()
    reopened = await Store.open(database_url)  # the second start of the balancer
    try:
        path.unlink()
        assert await KeyRing(reopened).bootstrap(path) is None
        assert not path.exists()  # keys exist: no new admin key is minted or written
        assert [k.name for k in await KeyRing(reopened).list()] == ["admin"]
    finally:
        await reopened.close()


async def test_bootstrap_with_auth_off_writes_nothing(tmp_path: Path, store: Store) -> None:
    path = tmp_path / "admin-key"
    assert await KeyRing(store, enabled=False).bootstrap(path) is None
    assert not path.exists()


SEED = "llmlb-" + "s33d" * 10


async def test_a_seeded_admin_key_is_stored_once_across_restarts_and_replicas_starting_at_once(
    tmp_path: Path, store: Store
) -> None:
    replicas = [KeyRing(store) for _ in range(4)]
    created = await asyncio.gather(*(ring.seed_admin(Secret(SEED)) for ring in replicas))
    assert len([key for key in created if key is not None]) == 1
    assert await KeyRing(store).seed_admin(Secret(SEED)) is None  # the next start
    listed = await KeyRing(store).list()
    assert [(k.scopes, k.prefix) for k in listed] == [((Scope.ADMIN,), SEED[:12])]
    ring = KeyRing(store)
    checked = await ring.check(SEED, Scope.ADMIN)
    assert checked is not None and checked.id == listed[0].id
    await ring.settle()
    # Seeded, the first start mints no other admin key (the balancer then skips bootstrap too).
    assert await KeyRing(store).bootstrap(tmp_path / "admin-key") is None


async def test_a_revoked_seeded_key_stays_revoked_when_the_balancer_starts_again(store: Store) -> None:
    key = await KeyRing(store).seed_admin(Secret(SEED))
    assert key is not None
    await KeyRing(store).revoke(key.id)
    assert await KeyRing(store).seed_admin(Secret(SEED)) is None
    assert await refused(KeyRing(store), SEED, Scope.ADMIN) is ErrorCode.UNAUTHORIZED


async def test_seeding_with_auth_off_stores_nothing(store: Store) -> None:
    assert await KeyRing(store, enabled=False).seed_admin(Secret(SEED)) is None
    assert await store.count_keys() == 0


def test_listed_keys_carry_no_secret() -> None:
    key = ApiKey("key-1", "ci", "llmlb-abcdef", "f" * 64, (Scope.API, Scope.NODE))
    msg = converters.api_key_to_pb(key)
    assert (msg.id, msg.name, msg.prefix) == ("key-1", "ci", "llmlb-abcdef")
    assert list(msg.scopes) == [pb.SCOPE_API, pb.SCOPE_NODE]
    assert b"f" * 64 not in msg.SerializeToString()
    assert not msg.HasField("revoked_at")


def test_scopes_convert_both_ways_and_unspecified_is_none() -> None:
    for scope in Scope:
        assert converters.scope_from_pb(converters.scope_to_pb(scope)) is scope
    assert converters.scope_from_pb(pb.SCOPE_UNSPECIFIED) is None
    assert converters.scope_from_pb(99) is None


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer llmlb-abc", "llmlb-abc"),
        ("bearer   llmlb-abc  ", "llmlb-abc"),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        ("Bearer    ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_reads_only_bearer_tokens(header: str | None, token: str | None) -> None:
    assert bearer(header) == token


@pytest.mark.parametrize(
    ("method", "scopes"),
    [
        ("/grpc.health.v1.Health/Check", ()),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", ()),
        ("/llmlb.v1.Inference/Chat", (Scope.API,)),
        ("/llmlb.v1.Registry/GetModel", (Scope.API, Scope.NODE)),
        ("/llmlb.v1.Registry/RegisterNode", (Scope.NODE,)),
        ("/llmlb.v1.Registry/NodeSession", (Scope.NODE,)),
        ("/llmlb.v1.Manifest/ReadBlob", (Scope.NODE,)),
        ("/llmlb.v1.Registry/DeleteModel", (Scope.ADMIN,)),
        ("/llmlb.v1.Registry/CreateKey", (Scope.ADMIN,)),
    ],
)
def test_each_method_needs_its_scope(method: str, scopes: tuple[Scope, ...]) -> None:
    rule = grpc_access(method)
    assert rule is not None and rule.scopes == scopes


def test_a_method_the_table_does_not_name_has_no_rule() -> None:
    assert grpc_access("/llmlb.v1.Registry/SomethingNew") is None


async def test_an_unlisted_call_is_refused_even_with_an_admin_key_and_auth_off(store: Store) -> None:
    for keys in (KeyRing(store), KeyRing(store, enabled=False)):
        _, secret = await keys.create("admin", [Scope.ADMIN])
        with pytest.raises(LlmlbError) as refused:
            await keys.authorize(secret, None, "/llmlb.v1.Registry/SomethingNew")
        assert refused.value.code is ErrorCode.FORBIDDEN


@pytest.mark.parametrize(
    "method", ["/llmlb.v1.Registry/GetModel", "/llmlb.v1.Registry/ListNodes", "/llmlb.v1.Manifest/ReadBlob"]
)
async def test_a_node_key_may_make_the_reads_a_node_makes(store: Store, method: str) -> None:
    keys = KeyRing(store)
    _, secret = await keys.create("node", [Scope.NODE])
    assert await keys.authorize(secret, grpc_access(method), method) is not None  # manifests, peers, bytes


async def test_a_node_key_may_not_manage_the_fleet(store: Store) -> None:
    keys = KeyRing(store)
    _, secret = await keys.create("node", [Scope.NODE])
    for method in (
        "/llmlb.v1.Registry/DeleteModel",
        "/llmlb.v1.Registry/RemoveNode",
        "/llmlb.v1.Inference/Chat",
    ):
        with pytest.raises(LlmlbError) as refusal:
            await keys.authorize(secret, grpc_access(method), method)
        assert refusal.value.code is ErrorCode.FORBIDDEN
