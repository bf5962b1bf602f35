"""The prefix cache's rules without an engine: longest match, LRU order, the byte budget, its names."""

from __future__ import annotations

import threading

from common.prefixes import MAX_REPORTED
from node.runtimes.prefix_cache import PrefixCache


def state(n: int) -> bytes:
    return bytes(n)


def test_lookup_finds_the_entry_sharing_the_longest_prefix() -> None:
    cache = PrefixCache(1000)
    cache.add([1, 2, 3], state(10), [11])
    cache.add([1, 2, 9, 9], state(10), [12])
    cache.add([5, 6], state(10), [13])
    entry, shared = cache.lookup([1, 2, 9, 9, 4])
    assert entry is not None and entry.tokens == (1, 2, 9, 9) and shared == 4
    entry, shared = cache.lookup([1, 2, 3, 7])
    assert entry is not None and entry.tokens == (1, 2, 3) and shared == 3
    assert cache.lookup([8, 8]) == (None, 0)


def test_the_least_recently_used_entry_goes_first_when_over_budget() -> None:
    cache = PrefixCache(30)
    cache.add([1], state(10), [1])
    cache.add([2], state(10), [2])
    cache.add([3], state(10), [3])
    cache.lookup([1, 0])  # used: now the newest
    cache.add([4], state(10), [4])
    assert cache.lookup([2])[0] is None
    assert all(cache.lookup([t])[0] is not None for t in (1, 3, 4))
    assert cache.bytes_held == 30


def test_bytes_never_exceed_the_budget_and_an_oversized_state_is_refused() -> None:
    cache = PrefixCache(100)
    for i in range(50):
        cache.add([i, i + 1], state(7 + i % 30), [i])
        assert cache.bytes_held <= 100
    assert not cache.add([999], state(101), [999])
    assert cache.bytes_held <= 100 and len(cache) > 0


def test_an_entry_extended_by_a_new_one_is_dropped_and_its_names_pass_on() -> None:
    cache = PrefixCache(1000)
    cache.add([1, 2], state(10), [11])
    cache.add([1, 2, 3, 4], state(20), [12])
    assert len(cache) == 1 and cache.bytes_held == 20
    assert set(cache.hashes()) == {11, 12}


def test_a_prefix_already_held_is_not_saved_again_but_takes_the_new_names() -> None:
    seen: list[int] = []
    cache = PrefixCache(1000, on_change=lambda: seen.append(1))
    cache.add([1, 2, 3], state(10), [11])
    assert cache.covers([1, 2], [21])
    assert cache.covers([1, 2, 3], [22])
    assert not cache.covers([1, 4], [23])
    assert set(cache.hashes()) == {11, 21, 22} and len(seen) == 3


def test_names_come_most_recently_used_first_and_are_capped() -> None:
    cache = PrefixCache(10**9)
    cache.add([1], state(1), [1, 2])
    cache.add([2], state(1), [3])
    assert cache.hashes() == [3, 1, 2]
    cache.lookup([1])
    assert cache.hashes() == [1, 2, 3]
    cache.add([3], state(1), range(100, 100 + MAX_REPORTED + 10))
    assert len(cache.hashes()) == MAX_REPORTED


def test_clear_empties_it_and_says_so() -> None:
    changes: list[list[int]] = []
    cache = PrefixCache(1000, on_change=lambda: changes.append(cache.hashes()))
    cache.add([1], state(10), [5])
    cache.clear()
    assert changes == [[5], []] and cache.bytes_held == 0 and cache.lookup([1]) == (None, 0)


def test_a_zero_budget_keeps_nothing() -> None:
    cache = PrefixCache(0)
    assert not cache.enabled
    assert not cache.add([1], state(1), [1]) and len(cache) == 0


def test_threads_adding_at_once_keep_the_byte_count_true() -> None:
    cache = PrefixCache(5000)

    def add(base: int) -> None:
        for i in range(200):
            cache.add([base, i], state(50 + i % 7), [base * 1000 + i])

    threads = [threading.Thread(target=add, args=(b,)) for b in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = sum(cache.lookup([b, i])[0] is not None for b in range(4) for i in range(200))
    assert held > 0 and cache.bytes_held <= 5000
