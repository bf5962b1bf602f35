"""Saved KV states of prompt prefixes for one model: a bounded, thread-safe LRU shared by its contexts.

A context that has evaluated a prompt saves the state of its first tokens here; a later request whose
prompt starts with the same tokens restores it and evaluates only the rest. Entries are found by the
longest common prefix of token ids, and each carries the ``common.prefixes`` hashes that name it to
the balancer, which routes a prompt to the node holding the longest computed prefix of it.

The cache holds bytes only; how a state is taken from or put back into an engine is the runtime's
business (``node.runtimes.llama``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from common.prefixes import MAX_REPORTED


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """One saved prefix: the token ids it covers, the engine's state after them, and its names."""

    tokens: tuple[int, ...]
    state: bytes
    hashes: tuple[int, ...]  # common.prefixes hashes naming the prompts this state serves

    @property
    def nbytes(self) -> int:
        return len(self.state)


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _merged(first: Iterable[int], then: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys((*first, *then)))


class PrefixCache:
    """Saved prefix states within ``budget_bytes``, least recently used evicted first.

    ``on_change`` is called (outside the lock, on whichever thread made the change) whenever the set
    of reported hashes may have changed: an entry added, merged, evicted, or the cache cleared.
    """

    def __init__(self, budget_bytes: int, on_change: Callable[[], None] | None = None) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self._on_change = on_change
        self._entries: OrderedDict[tuple[int, ...], CachedPrefix] = OrderedDict()  # oldest use first
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: Sequence[int]) -> tuple[CachedPrefix | None, int]:
        """The entry sharing the longest prefix with ``tokens``, and that length (0 and None if none).

        The entry found becomes the most recently used.
        """
        best, best_len = None, 0
        with self._lock:
            for entry in self._entries.values():
                if entry.tokens and tokens and entry.tokens[0] != tokens[0]:
                    continue
                n = common_length(entry.tokens, tokens)
                if n > best_len:
                    best, best_len = entry, n
            if best is not None:
                self._entries.move_to_end(best.tokens)
        return best, best_len

    def covers(self, tokens: Sequence[int], hashes: Sequence[int]) -> bool:
        """True when an entry already holds all of ``tokens``; it then also takes ``hashes`` as names.

        Saving such a prefix again would copy a state the cache already has, so the caller skips it.
        """
        key = tuple(tokens)
        changed = False
        with self._lock:
            holder = self._entries.get(key)
            if holder is None:
                extending = (e for e in reversed(self._entries.values()) if e.tokens[: len(key)] == key)
                holder = next(extending, None)
            if holder is None:
                return False
            merged = _merged(hashes, holder.hashes)
            if merged != holder.hashes:
                changed = True
                self._entries[holder.tokens] = CachedPrefix(holder.tokens, holder.state, merged)
            self._entries.move_to_end(holder.tokens)
        if changed:
            self._changed()
        return True

    def add(self, tokens: Sequence[int], state: bytes, hashes: Sequence[int]) -> bool:
        """Keeps ``state`` as the state after ``tokens``; False if it cannot fit the budget at all.

        Entries the new one extends are dropped (it serves every prompt they served) and their names
        pass to it; then the least recently used entries go until the cache fits its budget.
        """
        key = tuple(tokens)
        if not key or len(state) > self.budget_bytes:
            return False
        with self._lock:
            names = tuple(hashes)
            for old in [e for e in self._entries.values() if key[: len(e.tokens)] == e.tokens]:
                names = _merged(names, old.hashes)
                self._drop(old.tokens)
            self._entries[key] = CachedPrefix(key, state, names)
            self._bytes += len(state)
            while self._bytes > self.budget_bytes:
                self._drop(next(iter(self._entries)))
        self._changed()
        return True

    def hashes(self) -> list[int]:
        """The names of every entry, most recently used entries first, at most ``MAX_REPORTED``."""
        out: dict[int, None] = {}
        with self._lock:
            for entry in reversed(self._entries.values()):
                for h in entry.hashes:
                    out.setdefault(h, None)
                    if len(out) >= MAX_REPORTED:
                        return list(out)
        return list(out)

    def clear(self) -> None:
        with self._lock:
            had = bool(self._entries)
            self._entries.clear()
            self._bytes = 0
        if had:
            self._changed()

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
