"""The fleet token: the credential every node accepts on its ``Inference`` and ``Manifest`` port.

The balancer generates a random secret on its first start and keeps it in its store, so restarts and
replicas sharing one database agree. Tokens handed to nodes are derived from that secret and from a
time window (``epoch``: wall-clock seconds // the token lifetime), never the secret itself, so a
token kept by anyone stops working by itself: a node is handed the token of the current window and
of the next one, each accepted until its window ends plus a short grace, and renews them over its
session before they run out. Replicas derive the same tokens from the same secret and clock.

Revoking a key that could have fetched a token (``node`` or ``admin`` scope) replaces the secret
(``rotate``): every replica re-reads it and sends its nodes the new tokens with ``replaces`` set, so
each node forgets the old ones and a token kept after the revocation opens nothing within seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from balancer.store import Store

SECRET_NAME = "node-fleet"
SECRET_BYTES = 32
# Names what the derived value is for; another use of the same secret derives with another label.
LABEL = b"llmlb node fleet token v2"
# After its window a token is still accepted this long (at most a quarter of the lifetime), so a
# replica whose clock runs a little behind, or a call made at the turn, is not refused.
MAX_GRACE_S = 60.0


def derive(secret: str, epoch: int) -> str:
    """The fleet token of window ``epoch`` (hex HMAC-SHA256 of the label and the window)."""
    return hmac.new(secret.encode(), LABEL + b"|%d" % epoch, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Grant:
    """What a node is handed: the token to present and each token to accept for how long."""

    token: str = field(repr=False)
    accepted: tuple[tuple[str, float], ...] = field(repr=False)  # (token, seconds from now)
    replaces: bool = False


class FleetTokens:
    """Derives, checks and rotates the fleet tokens; ``version`` changes whenever the secret does."""

    def __init__(self, store: Store, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        if ttl_s <= 0:
            raise ValueError("the fleet token lifetime must be positive")
        self._store = store
        self.ttl_s = ttl_s
        self.grace_s = min(MAX_GRACE_S, ttl_s / 4)
        self._clock = clock  # wall-clock seconds: every replica must derive the same window
        self._secret = ""
        self.version = 0

    async def load(self) -> None:
        """Reads the secret, creating it in the store on the balancer's first start."""
        self._set(await self._store.secret(SECRET_NAME, _new_secret))

    async def reload(self) -> bool:
        """Re-reads the secret (another replica may have rotated it); True when it changed."""
        return self._set(await self._store.secret(SECRET_NAME, _new_secret))

    async def rotate(self) -> None:
        """Replaces the secret: every token handed out so far stops working."""
        self._set(await self._store.replace_secret(SECRET_NAME, _new_secret()))

    def _set(self, secret: str) -> bool:
        if secret == self._secret:
            return False
        self._secret = secret
        self.version += 1
        return True

    def epoch(self) -> int:
        return int(self._clock() // self.ttl_s)

    def seconds_to_next(self) -> float:
        """Seconds until the window turns (when nodes must hold the window after next)."""
        return (self.epoch() + 1) * self.ttl_s - self._clock()

    def current(self) -> str:
        """The token to present now (routed calls to nodes); empty before ``load``."""
        return derive(self._secret, self.epoch()) if self._secret else ""

    def grant(self, *, replaces: bool = False) -> Grant:
        """The tokens of this window and the next, each good until its window ends plus the grace."""
        now, epoch = self._clock(), self.epoch()
        accepted = tuple(
            (derive(self._secret, e), (e + 1) * self.ttl_s + self.grace_s - now) for e in (epoch, epoch + 1)
        )
        return Grant(accepted[0][0], accepted, replaces)

    def accepts(self, presented: str | None) -> bool:
        """Whether ``presented`` is a token a node holds now (compared in constant time)."""
        if not presented or not self._secret:
            return False
        now, epoch = self._clock(), self.epoch()
        windows = [epoch, epoch + 1]
        if now - epoch * self.ttl_s < self.grace_s:
            windows.append(epoch - 1)
        ok = False
        for e in windows:
            ok |= hmac.compare_digest(presented.encode(), derive(self._secret, e).encode())
        return ok


def _new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)
