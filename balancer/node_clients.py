"""One long-lived gRPC channel per node, so routed calls never pay for a connection."""

from __future__ import annotations

import grpc.aio

from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import CHANNEL_OPTIONS


class NodeClients:
    """``Inference`` stubs by node id; a node that registers at a new address gets a new channel."""

    def __init__(self) -> None:
        self._clients: dict[str, tuple[str, grpc.aio.Channel, igrpc.InferenceStub]] = {}
        # Channels of nodes that moved: calls may still run on them, so they close at shutdown.
        self._old: list[grpc.aio.Channel] = []

    def stub(self, node_id: str, address: str) -> igrpc.InferenceStub:
        known = self._clients.get(node_id)
        if known is not None and known[0] == address:
            return known[2]
        if known is not None:
            self._old.append(known[1])
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        stub = igrpc.InferenceStub(channel)
        self._clients[node_id] = (address, channel, stub)
        return stub

    async def close(self) -> None:
        for _, channel, _ in self._clients.values():
            await channel.close(None)
        for channel in self._old:
            await channel.close(None)
        self._clients.clear()
        self._old.clear()
