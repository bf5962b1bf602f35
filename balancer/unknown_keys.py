"""Tokens the store does not know: remembered apart from real keys, and looked up at a bounded rate.

Each token never seen before costs one store read. What the store says about a token it does not
hold is remembered in a bounded cache of its own (``UnknownTokens``), so a flood of random tokens
can never push a real key out of the key cache (which the balancer answers from during a database
outage). And each client address may cause only so many reads for never-seen tokens a second
(``LookupRate``); past that such a token is refused without touching the store. A read that finds a
key gives its lookup back, so only misses spend an address's budget: a client with a real new key is
held back only after it (or its address) sent tokens that were not keys.
"""

from __future__ import annotations

UNKNOWN_CACHE = 10_000  # unknown tokens remembered; the oldest is forgotten first
UNKNOWN_TTL_S = 30.0  # how long an unknown token is answered from memory
LOOKUPS_PER_S = 5.0  # store reads for never-seen tokens, per client address and second (burst as many)
ADDRESSES = 10_000  # client addresses whose lookup rate is remembered; the least recent is forgotten


class UnknownTokens:
    """Digests of tokens the store said it does not hold, each for ``ttl_s``; at most ``size`` of them."""

    def __init__(self, size: int = UNKNOWN_CACHE, ttl_s: float = UNKNOWN_TTL_S) -> None:
        self._size = max(1, size)
        self._ttl_s = ttl_s
        self._expires: dict[str, float] = {}  # digest -> until when; in insertion order, so oldest first

    def __len__(self) -> int:
        return len(self._expires)

    def holds(self, digest: str, now: float) -> bool:
        """Whether ``digest`` is remembered as unknown at ``now`` (monotonic seconds)."""
        until = self._expires.get(digest)
        if until is None:
            return False
        if until > now:
            return True
        del self._expires[digest]
        return False

    def add(self, digest: str, now: float) -> None:
        self._expires.pop(digest, None)
        self._expires[digest] = now + self._ttl_s
        while len(self._expires) > self._size:  # every entry lives as long, so the first ends first
            del self._expires[next(iter(self._expires))]

    def discard(self, digest: str) -> None:
        self._expires.pop(digest, None)

    def clear(self) -> None:
        self._expires.clear()


class LookupRate:
    """A token bucket per client address: ``per_s`` lookups a second, and as many at once.

    At most ``addresses`` buckets are kept (least recently used forgotten first), so callers from
    many addresses cannot grow memory either.
    """

    def __init__(self, per_s: float = LOOKUPS_PER_S, *, addresses: int = ADDRESSES) -> None:
        self._per_s = per_s
        self._burst = max(1.0, per_s)
        self._addresses = max(1, addresses)
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when counted)

    def take(self, address: str, now: float) -> float:
        """Spends one lookup of ``address`` at ``now``: 0.0 when allowed, else the seconds until one is."""
        tokens, then = self._buckets.pop(address, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._per_s)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self._per_s
        self._buckets[address] = (tokens, now)  # re-inserted: the dict's order is least recent first
        while len(self._buckets) > self._addresses:
            del self._buckets[next(iter(self._buckets))]
        return wait

    def give_back(self, address: str) -> None:
        """Returns a lookup ``take`` allowed: it found a key, so it does not count against ``address``."""
        bucket = self._buckets.get(address)
        if bucket is not None:
            self._buckets[address] = (min(self._burst, bucket[0] + 1.0), bucket[1])
