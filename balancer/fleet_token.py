"""The fleet token: the credential every node accepts on its ``Inference`` and ``Manifest`` port.

The balancer generates a random secret on its first start and keeps it in its store, so restarts and
replicas sharing one database agree. The token handed to nodes (in ``RegisterNodeResponse``) is derived
from that secret rather than being the secret itself, so whatever else the secret may key later is
never in a node's hands. ``RegisterNode`` is guarded by a ``node``-scope key when keys are on: only
nodes the operator admitted learn the token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from balancer.store import Store

SECRET_NAME = "node-fleet"
SECRET_BYTES = 32
# Names what the derived value is for; another use of the same secret derives with another label.
LABEL = b"llmlb node fleet token v1"


def derive(secret: str) -> str:
    """The fleet token ``secret`` stands for (hex HMAC-SHA256 of a fixed label)."""
    return hmac.new(secret.encode(), LABEL, hashlib.sha256).hexdigest()


async def load_fleet_token(store: Store) -> str:
    """The fleet token, creating the secret behind it in ``store`` on the balancer's first start."""
    secret = await store.secret(SECRET_NAME, lambda: secrets.token_urlsafe(SECRET_BYTES))
    return derive(secret)
