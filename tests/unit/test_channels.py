"""A channel opened with a key presents it on every kind of call: unary, server-streaming and bidi."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from balancer.server import start
from common.channels import open_channel
from common.config import load_balancer_config
from common.errors import ErrorCode
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.rpc import error_from_rpc


async def test_every_call_kind_carries_the_key_and_none_without_it(tmp_path: Path) -> None:
    env = {"LLMLB_GRPC_LISTEN": "127.0.0.1:0", "LLMLB_HTTP_LISTEN": "off", "LLMLB_LOG_LEVEL": "warning"}
    config = load_balancer_config(home=tmp_path, env=env)
    balancer = await start(config)
    key = config.admin_key_file.read_text().strip()
    target = f"127.0.0.1:{balancer.port}"
    try:
        async with open_channel(target, api_key=key) as channel:
            registry = rgrpc.RegistryStub(channel)
            registered = await registry.RegisterNode(
                rpb.RegisterNodeRequest(node_id="n1", address="127.0.0.1:1")
            )
            assert registered.node_id == "n1"  # unary

            async def hello() -> AsyncIterator[rpb.NodeMessage]:
                yield rpb.NodeMessage(hello=rpb.NodeHello(node_id="n1"))

            session: Any = registry.NodeSession(hello())
            first = await session.read()  # bidi stream
            assert first.accepted.node_id == "n1"
            session.cancel()

            # server streaming: the key gets the call past auth to the router, which finds no node
            with pytest.raises(grpc.aio.AioRpcError) as routed:
                async for _ in igrpc.InferenceStub(channel).Complete(
                    ipb.CompleteRequest(model="gemma-3-270m", prompt="x"), timeout=5
                ):
                    pass
            assert error_from_rpc(routed.value).code is ErrorCode.NO_CAPABLE_NODES

        async with open_channel(target) as bare:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await rgrpc.RegistryStub(bare).ListModels(rpb.ListModelsRequest())
            assert error_from_rpc(refused.value).code is ErrorCode.UNAUTHORIZED
    finally:
        await balancer.stop()
