"""Which node holds which prompt prefixes of a model: what nodes reported, and what the router just sent.

Nodes report the prefixes each model keeps computed (``PrefixReport``, kept in ``Fleet``: replaced by
each report, capped at ``MAX_REPORTED`` per node and model, forgotten when the node's session ends, it
is removed or it registers again). A report lags the request that computed the prefix by a moment, and
the next turn of a conversation often comes sooner; so the router also remembers, for a short while,
the prefixes of each request it routed, as held by the node it chose (a prediction). A prediction lasts
``PREDICTION_TTL_S`` seconds of the injected clock, at most ``MAX_PREDICTIONS`` are kept (the oldest go
first), and one made before the node last lost its memory (``Fleet.epoch``) no longer counts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from balancer.fleet.view import Fleet
from common.prefixes import Prefix, longest_held

PREDICTION_TTL_S = 30.0  # long enough for a node's report to arrive, short enough not to outlive eviction
MAX_PREDICTIONS = 65_536  # prefixes remembered across all nodes and models (a few MB at most)

_Key = tuple[str, str, int]  # (model id, node id, prefix hash)


class PrefixIndex:
    """Answers how much of a request's prompt a node holds computed, from reports and predictions."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        clock: Callable[[], float],
        ttl_s: float = PREDICTION_TTL_S,
        max_predictions: int = MAX_PREDICTIONS,
    ) -> None:
        self._fleet = fleet
        self._clock = clock
        self._ttl_s = ttl_s
        self._max = max_predictions
        # Insertion order is expiry order (one TTL for all), so the oldest are always at the front.
        self._predicted: OrderedDict[_Key, tuple[int, float]] = OrderedDict()  # -> (epoch, expires)

    def routed(self, node_id: str, model_id: str, prefixes: Sequence[Prefix]) -> None:
        """A request with ``prefixes`` went to ``node_id``: it will hold them once it has answered."""
        if not prefixes:
            return
        epoch, expires = self._fleet.epoch(node_id), self._clock() + self._ttl_s
        for prefix in prefixes:
            key = (model_id, node_id, prefix.hash)
            self._predicted[key] = (epoch, expires)
            self._predicted.move_to_end(key)
        self._trim()

    def held_chars(self, node_id: str, model_id: str, prefixes: Sequence[Prefix]) -> int:
        """Characters of the longest of ``prefixes`` that ``node_id`` holds for ``model_id``; 0 if none."""
        if not prefixes:
            return 0
        reported = self._fleet.prefixes(node_id, model_id)
        epoch, now = self._fleet.epoch(node_id), self._clock()
        predicted = self._predicted

        def held(h: int) -> bool:
            if h in reported:
                return True
            guess = predicted.get((model_id, node_id, h))
            return guess is not None and guess[0] == epoch and guess[1] > now

        return longest_held(prefixes, held)

    def __len__(self) -> int:
        """Predictions kept now (expired ones are dropped as new ones arrive)."""
        return len(self._predicted)

    def _trim(self) -> None:
        predicted, now = self._predicted, self._clock()
        while predicted:
            key, (_epoch, expires) = next(iter(predicted.items()))
            if len(predicted) <= self._max and expires > now:
                break
            del predicted[key]
