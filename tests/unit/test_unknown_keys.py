"""The rules for tokens the store does not know, without a store or sockets: a bounded memory of
unknown tokens, a lookup rate per client address, and the gRPC peer's address."""

from __future__ import annotations

import pytest

from balancer.auth import peer_host
from balancer.unknown_keys import LookupRate, UnknownTokens


def test_an_unknown_token_is_remembered_for_its_ttl_only() -> None:
    unknown = UnknownTokens(size=10, ttl_s=30.0)
    unknown.add("a", now=100.0)
    assert unknown.holds("a", 129.9)
    assert not unknown.holds("a", 130.0)
    assert len(unknown) == 0  # an expired entry is dropped when found


def test_unknown_tokens_past_the_size_forget_the_oldest_first() -> None:
    unknown = UnknownTokens(size=3, ttl_s=30.0)
    for i, digest in enumerate("abcde"):
        unknown.add(digest, now=100.0 + i)
    assert len(unknown) == 3
    assert [d for d in "abcde" if unknown.holds(d, 105.0)] == ["c", "d", "e"]
    unknown.add("c", now=106.0)  # seen again: now the newest
    unknown.add("f", now=107.0)
    assert [d for d in "cdef" if unknown.holds(d, 107.0)] == ["c", "e", "f"]


def test_each_address_gets_its_rate_and_a_burst_of_as_many() -> None:
    rate = LookupRate(per_s=2.0)
    assert [rate.take("10.0.0.1", 100.0) for _ in range(2)] == [0.0, 0.0]
    assert rate.take("10.0.0.1", 100.0) == pytest.approx(0.5)  # the wait until the next is allowed
    assert rate.take("10.0.0.2", 100.0) == 0.0  # another address has its own budget
    assert rate.take("10.0.0.1", 100.5) == 0.0  # one lookup back after half a second
    assert rate.take("10.0.0.1", 100.5) > 0.0
    later = [rate.take("10.0.0.1", 200.0) for _ in range(3)]
    assert later[:2] == [0.0, 0.0] and later[2] > 0.0  # a long pause still allows a burst of 2 only


def test_refused_lookups_do_not_dig_the_hole_deeper() -> None:
    rate = LookupRate(per_s=1.0)
    assert rate.take("a", 0.0) == 0.0
    for _ in range(100):
        assert rate.take("a", 0.0) == pytest.approx(1.0)
    assert rate.take("a", 1.0) == 0.0  # a caller that kept asking gets its next lookup on time


def test_a_lookup_that_found_a_key_is_given_back() -> None:
    rate = LookupRate(per_s=1.0)
    for _ in range(5):  # five new keys in a row from one address: each found, none held back
        assert rate.take("a", 0.0) == 0.0
        rate.give_back("a")
    assert rate.take("a", 0.0) == 0.0  # a miss spends the one lookup
    assert rate.take("a", 0.0) > 0.0


def test_the_addresses_remembered_are_bounded_least_recent_first() -> None:
    rate = LookupRate(per_s=1.0, addresses=2)
    rate.take("a", 0.0)
    rate.take("b", 0.0)
    rate.take("a", 0.0)  # "a" used again: "b" is now the least recent
    rate.take("c", 0.0)
    assert rate.take("a", 0.0) > 0.0  # still remembered, its budget spent
    assert rate.take("b", 0.0) == 0.0  # forgotten, so it starts afresh


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:50123", "127.0.0.1"),
        ("ipv6:[::1]:50123", "::1"),
        ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
        ("unix:/run/llmlb.sock", "unix:/run/llmlb.sock"),
    ],
)
def test_a_grpc_peer_is_its_address_without_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host
