"""Fleet tokens expire and rotate: the balancer's derivation and a node's holding of them, on an
injected clock (the store only keeps the secret)."""

from __future__ import annotations

from pathlib import Path

from balancer.fleet.token import FleetTokens
from balancer.store import Store
from common.secret import Secret
from node.token_auth import NodeCredentials

TTL_S = 100.0  # the grace is a quarter of it: 25 s


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def tokens_at(tmp_path: Path, clock: Clock) -> tuple[Store, FleetTokens]:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'llmlb.db'}")
    tokens = FleetTokens(store, TTL_S, clock=clock)
    await tokens.load()
    return store, tokens


async def test_a_token_works_for_its_window_the_one_before_and_a_grace_after_then_never(
    tmp_path: Path,
) -> None:
    clock = Clock(1_000.0)  # window 10
    store, tokens = await tokens_at(tmp_path, clock)
    try:
        kept = tokens.current()
        assert tokens.accepts(kept)
        clock.now = 1_099.0
        assert tokens.accepts(kept) and tokens.current() == kept
        clock.now = 1_110.0  # window 11, within the grace
        assert tokens.current() != kept and tokens.accepts(kept)
        clock.now = 1_126.0  # past the grace
        assert not tokens.accepts(kept)
        assert not tokens.accepts("") and not tokens.accepts(None) and not tokens.accepts("x" * 64)
    finally:
        await store.close()


async def test_a_grant_holds_this_window_and_the_next_until_each_ends_plus_the_grace(tmp_path: Path) -> None:
    clock = Clock(1_040.0)  # window 10: it ends at 1100
    store, tokens = await tokens_at(tmp_path, clock)
    try:
        grant = tokens.grant()
        (now_token, now_s), (next_token, next_s) = grant.accepted
        assert grant.token == now_token == tokens.current() and not grant.replaces
        assert (now_s, next_s) == (85.0, 185.0)  # 1100 + 25 - 1040, 1200 + 25 - 1040
        clock.now = 1_100.0
        assert tokens.current() == next_token  # what the balancer presents next, the node holds already
        assert tokens.seconds_to_next() == TTL_S
        assert str(grant).count(now_token) == 0  # never printed
    finally:
        await store.close()


async def test_rotating_refuses_every_token_handed_out_before_at_once(tmp_path: Path) -> None:
    store, tokens = await tokens_at(tmp_path, Clock(1_000.0))
    try:
        kept = [t for t, _ in tokens.grant().accepted]
        version = tokens.version
        await tokens.rotate()
        assert tokens.version != version
        assert not any(tokens.accepts(t) for t in kept)
        assert tokens.accepts(tokens.current())
    finally:
        await store.close()


def test_a_node_accepts_each_fleet_token_until_its_time_runs_out() -> None:
    clock = Clock(50.0)
    credentials = NodeCredentials(clock=clock)
    credentials.set_fleet_tokens("now", [("now", 10.0), ("next", 20.0)], replaces=False)
    assert credentials.accepts("now") and credentials.accepts("next") and credentials.for_peers() == "now"
    clock.now = 61.0
    assert not credentials.accepts("now") and credentials.accepts("next")
    assert not credentials.has_fleet_token and credentials.for_peers() == ""  # its own: none set
    credentials.set_fleet_tokens("next", [("next", 20.0), ("later", 30.0)], replaces=False)
    assert credentials.for_peers() == "next" and credentials.accepts("later")
    clock.now = 200.0
    assert not any(credentials.accepts(t) for t in ("now", "next", "later"))


def test_a_rotation_makes_a_node_forget_every_token_it_accepted_before() -> None:
    credentials = NodeCredentials(Secret("own-token"), clock=Clock(0.0))
    credentials.set_fleet_tokens("old", [("old", 100.0), ("old-next", 200.0)], replaces=False)
    credentials.set_fleet_tokens("new", [("new", 100.0), ("new-next", 200.0)], replaces=True)
    assert not credentials.accepts("old") and not credentials.accepts("old-next")
    assert credentials.accepts("new") and credentials.accepts("new-next") and credentials.accepts("own-token")
