"""Clients of several balancer replicas that retry a lost connection on another replica, as
"Production: replicas on PostgreSQL" in docs/operations.md tells a client to, and keep a record of
every attempt.

Each client has a home replica. A request whose connection is refused or lost before an answer is sent
again, with the same request id, to the next replica, round the list until it is answered or its
deadline has passed; an error a replica sent itself is not retried, but for ``queue_full`` (a replica
shedding load): that request waits the refusal's ``Retry-After`` and is sent again to the next replica
with what is left of its deadline, as OpenAI's own client does with a 429. Every retry is counted, so
a drill can say what was lost (no answer), what was answered twice and what was answered wrongly (an
answer carrying another request's id).

```python
clients = ReplicaClients([(a.http_url, a.address), (b.http_url, b.address)], key, model, prompt)
ask = await clients.ask(HTTP, home=0, marker="http-0-7")  # A first, then B on a connection failure
await clients.close()
```
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.errors import ErrorCode
from devkit.load_clients import HTTP, LoadClients, Outcome, markers, summary

# Connection failures a client may retry on another replica: nothing reached a node, or the replica
# died before it could answer. An error a replica sent itself is never retried.
RETRIABLE = frozenset({"connect", "connection lost", "grpc UNAVAILABLE"})
# A replica shedding load (429 / RESOURCE_EXHAUSTED): asked again, on the next replica, after Retry-After.
SHED = ErrorCode.QUEUE_FULL.value
PAUSE_S = 0.05  # between one client's requests
BOTH_REFUSED_PAUSE_S = 0.1  # every replica refused: give a restart, or the network, a moment


@dataclass
class Ask:
    """One request as its client saw it: every attempt, starting at its home replica."""

    marker: str
    home: int
    replicas: int
    attempts: list[Outcome] = field(default_factory=list)

    @property
    def answer(self) -> Outcome | None:
        """The first attempt that was answered, if any."""
        answered = [o for o in self.attempts if o.answered]
        return answered[0] if answered else None

    def replica_of(self, attempt: int) -> int:
        """The replica the ``attempt``-th try (from 0) went to."""
        return (self.home + attempt) % self.replicas


class ReplicaClients:
    """Clients of the replicas at ``endpoints`` (``(http_url, grpc_address)`` each), sharing one key.

    Every request is a completion of ``prompt`` on ``model``; ``max_tokens`` cycles through the given
    counts, one request after another. ``connections`` bounds each replica's HTTP pool.
    """

    def __init__(
        self,
        endpoints: Sequence[tuple[str, str]],
        key: str,
        model: str,
        prompt: str,
        *,
        max_tokens: Sequence[int] = (3,),
        connections: int = 32,
    ) -> None:
        self.clients = [
            LoadClients(http, address, key, connections=connections) for http, address in endpoints
        ]
        self.model = model
        self.prompt = prompt
        self.max_tokens = tuple(max_tokens)
        self.asks: list[Ask] = []

    async def close(self) -> None:
        for clients in self.clients:
            await clients.__aexit__(None, None, None)

    async def ask(self, door: str, home: int, marker: str, deadline_s: float = 60.0) -> Ask:
        """One request through ``door``, first to replica ``home``, retried as the module says."""
        ask = Ask(marker, home, len(self.clients))
        tokens = self.max_tokens[len(self.asks) % len(self.max_tokens)]
        self.asks.append(ask)
        started = time.monotonic()
        call_s = deadline_s  # each attempt's deadline; after a shed one, what is left of the request's
        while time.monotonic() - started < deadline_s:
            clients = self.clients[ask.replica_of(len(ask.attempts))]
            send = clients.http_complete if door == HTTP else clients.grpc_complete
            outcome = await send(marker, self.model, self.prompt, max_tokens=tokens, deadline_s=call_s)
            ask.attempts.append(outcome)
            if outcome.error.endswith(SHED):
                left = deadline_s - (time.monotonic() - started)
                if outcome.retry_after_s >= left:
                    break
                wait = max(outcome.retry_after_s, BOTH_REFUSED_PAUSE_S)
                await asyncio.sleep(wait)
                call_s = left - wait
                continue
            if outcome.error not in RETRIABLE:
                break
            if ask.replica_of(len(ask.attempts)) == home:  # every replica refused
                await asyncio.sleep(BOTH_REFUSED_PAUSE_S)
        return ask

    async def keep_asking(self, door: str, home: int, prefix: str, until: asyncio.Event) -> None:
        """One client: asks one request after another (ids ``<prefix>-<n>-<run>``) until ``until`` is set."""
        next_marker = markers(prefix)
        while not until.is_set():
            await self.ask(door, home, next_marker())
            await asyncio.sleep(PAUSE_S)

    def describe(self) -> str:
        """One line for a failure message: outcomes by door and result, retries, the latest requests."""
        outcomes = [o for a in self.asks for o in a.attempts]
        recent = [(a.marker, [o.error or "ok" for o in a.attempts]) for a in self.asks[-8:]]
        return f"{summary(outcomes)}; retries {self.retries()}; latest {recent}"

    def retries(self) -> int:
        return sum(len(a.attempts) - 1 for a in self.asks)

    def answers_on(self, replica: int, since: float) -> list[Outcome]:
        """Answers ``replica`` gave to attempts sent after ``since`` (a ``time.monotonic()``)."""
        return [
            o
            for a in self.asks
            for i, o in enumerate(a.attempts)
            if o.answered and o.started >= since and a.replica_of(i) == replica
        ]

    def answered_on(self, replica: int, since: float) -> int:
        """How many requests ``replica`` answered that were sent after ``since``."""
        return len(self.answers_on(replica, since))
