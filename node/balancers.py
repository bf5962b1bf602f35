"""Which balancer a node talks to when it knows several addresses (replicas sharing one store).

``BalancerChannels`` holds one channel per address, opened on first use, and which address is current:
every call the node makes to a balancer goes to the current one, and lookups move on to the next
address while the one asked does not answer. ``Reattach`` is the rule for where, and after how long,
the node's session tries next once it has ended: at once to the next address when a live session
broke, with capped exponential backoff only after every address has failed in turn.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
import grpc.aio
import structlog

from common.errors import ErrorCode, LlmlbError
from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc as mgrpc
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.rpc import error_from_rpc, unreachable
from common.types import ManifestFile, Model
from node.blob_sources import BulkSource, RangeWriter, ReadBlobSource

log = structlog.get_logger(__name__)
T = TypeVar("T")

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0
# A session up this long counts as healthy: the backoff starts again from the first step.
HEALTHY_SESSION_S = 10.0
# A broken session moves to the next address at once, but not twice within this long: replicas that
# each accept the session and drop it again would otherwise be called in a tight loop.
FAILOVER_AT_ONCE_EVERY_S = 10.0


class BalancerChannels:
    """The node's channels to its balancers and the one that is current (attached, or last answering)."""

    def __init__(self, addresses: Sequence[str], open_channel: Callable[[str], grpc.aio.Channel]) -> None:
        if not addresses:
            raise ValueError("at least one balancer address is needed")
        self.addresses = tuple(addresses)
        self._open = open_channel
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.current = 0  # index into ``addresses``

    @property
    def address(self) -> str:
        """The current balancer's address."""
        return self.addresses[self.current]

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to the current balancer."""
        return self.channel_to(self.current)

    def channel_to(self, index: int) -> grpc.aio.Channel:
        address = self.addresses[index]
        channel = self._channels.get(address)
        if channel is None:
            channel = self._open(address)
            self._channels[address] = channel
        return channel

    def registry(self, index: int) -> rgrpc.RegistryAsyncStub:
        return rgrpc.RegistryStub(self.channel_to(index))

    async def ask(self, ask: Callable[[rgrpc.RegistryAsyncStub], Awaitable[T]], *, settle: bool) -> T:
        """Asks the current balancer; while the one asked does not answer, the next address in turn.

        With ``settle`` the balancer that answered becomes the current one (no session decides it, as in
        ``xllm pull``); an error the balancer answered with is raised as it is, the last address's too.
        """
        count = len(self.addresses)
        first = self.current
        for step in range(count):
            index = (first + step) % count
            try:
                answer = await ask(self.registry(index))
            except grpc.aio.AioRpcError as exc:
                if step == count - 1 or not unreachable(exc):
                    raise
                log.info("balancer.unreachable", balancer=self.addresses[index], error=exc.code().name)
                continue
            if settle:
                self.current = index
            return answer
        raise AssertionError("the loop returns or raises on its last address")

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()


class BalancerProxySource:
    """The balancer's origin proxy, read from whichever balancer is current when a read starts (a read
    that starts or resumes after a failover goes to the replica the node moved to).

    Over the balancer's bulk proxy (HTTP ranges, ``Manifest.GetBulkEndpoint`` says its port) when it
    runs one, else over ``Manifest.ReadBlob``.
    """

    name = "balancer"
    via = "bulk, else grpc"

    def __init__(self, channels: BalancerChannels, token: Callable[[], str] = lambda: "") -> None:
        self._channels = channels
        self._token = token
        self._bulk_ports: dict[str, int] = {}  # balancer address -> its bulk port (0: none)

    async def _bulk(self) -> BulkSource | None:
        address = self._channels.address
        port = self._bulk_ports.get(address)
        if port is None:
            try:
                reply = await mgrpc.ManifestStub(self._channels.channel).GetBulkEndpoint(
                    mpb.GetBulkEndpointRequest(), timeout=5.0
                )
                port = reply.port
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise error_from_rpc(exc) from None
                port = 0  # an older balancer: ReadBlob only
            self._bulk_ports[address] = port
        if port <= 0:
            return None
        return BulkSource(self.name, address.rpartition(":")[0], port, self._token)

    async def read_into(
        self, model: Model, file: ManifestFile, offset: int, length: int, write: RangeWriter
    ) -> None:
        bulk = await self._bulk()
        if bulk is not None:
            await bulk.read_into(model, file, offset, length, write)
            return
        position = offset
        async for chunk in self.stream(model, file, offset, length):
            view = memoryview(chunk)[: offset + length - position]
            write(position, view)
            position += len(view)
            if position >= offset + length:
                return
        raise LlmlbError(
            ErrorCode.DOWNLOAD_FAILED,
            f"{self.name} ended {file.filename} at byte {position}, {offset + length} was expected",
        )

    async def stream(
        self, model: Model, file: ManifestFile, offset: int, length: int = 0
    ) -> AsyncIterator[bytes]:
        source = ReadBlobSource(self.name, self._channels.channel)
        async for chunk in source.stream(model, file, offset, length):
            yield chunk


class Reattach:
    """Where the node's session tries next, and after how long, each time an attempt ends.

    With one address: that one again, after a capped exponential backoff (reset by a healthy session).
    With several: after a session that had been up, the next address at once; after a failed attempt,
    the next address at once while the round has addresses left; once every address has failed in
    turn, the backoff before the next round.
    """

    def __init__(
        self,
        count: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = lambda: random.uniform(0.8, 1.2),
    ) -> None:
        self._count = count
        self._clock = clock
        self._jitter = jitter
        self._backoff = BACKOFF_FIRST_S
        self._failed = 0  # addresses that failed in a row in this round
        self._last_failover = float("-inf")

    def after(self, index: int, up_s: float | None) -> tuple[int, float]:
        """The next address's index and the seconds to wait first, once the attempt on ``index`` ended.

        ``up_s``: how long the session had been up, None when it never came up.
        """
        if up_s is not None and up_s > HEALTHY_SESSION_S:
            self._backoff = BACKOFF_FIRST_S
        following = (index + 1) % self._count
        if self._count > 1:
            now = self._clock()
            if up_s is not None and now - self._last_failover > FAILOVER_AT_ONCE_EVERY_S:
                # The replica died under a live session: another one is most likely up; go there now.
                self._last_failover = now
                self._failed = 1  # the address that broke counts as the round's first failure
                return following, 0.0
            self._failed += 1
            if self._failed < self._count:
                return following, 0.0
            self._failed = 0
        delay = self._backoff * self._jitter()
        self._backoff = min(BACKOFF_MAX_S, self._backoff * 2)
        return following, delay
