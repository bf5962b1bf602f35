"""One long-lived gRPC channel per node, so routed calls never pay for a connection."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc.aio

from common.channels import ApiKeySource, open_channel
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc


@dataclass(frozen=True, slots=True)
class _Client:
    address: str
    token: ApiKeySource = field(repr=False)
    channel: grpc.aio.Channel
    stub: igrpc.InferenceStub


class NodeClients:
    """``Inference`` stubs by node id, each presenting the node's token on every call.

    A node that registers again at a new address or with a new token gets a new channel.
    """

    def __init__(self) -> None:
        self._clients: dict[str, _Client] = {}
        # Channels of nodes that moved or changed token: calls may still run on them, so they close
        # at shutdown.
        self._old: list[grpc.aio.Channel] = []

    def stub(self, node_id: str, address: str, token: ApiKeySource = "") -> igrpc.InferenceStub:
        """The node's stub; a callable ``token`` (the fleet token, which rotates) is read at each call."""
        known = self._clients.get(node_id)
        if known is not None and known.address == address and known.token == token:
            return known.stub
        if known is not None:
            self._old.append(known.channel)
        # The node's port speaks plaintext (it lives on a private network); the token is its lock.
        channel = open_channel(address, api_key=token)
        client = _Client(address, token, channel, igrpc.InferenceStub(channel))
        self._clients[node_id] = client
        return client.stub

    async def close(self) -> None:
        for client in self._clients.values():
            await client.channel.close(None)
        for channel in self._old:
            await channel.close(None)
        self._clients.clear()
        self._old.clear()
