"""The balancer itself on PostgreSQL: its state lives in the database, not in its home directory."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from balancer.server import Balancer, start
from common.channels import open_channel
from common.config import BalancerConfig, load_balancer_config
from common.errors import ErrorCode
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import error_from_rpc

pytestmark = pytest.mark.timeout(120)


def postgres_config(home: Path, database_url: str) -> BalancerConfig:
    env = {
        "LLMLB_HOME": str(home),
        "LLMLB_DATABASE_URL": database_url,
        "LLMLB_GRPC_LISTEN": "127.0.0.1:0",
        "LLMLB_HTTP_LISTEN": "off",
        "LLMLB_LOG_LEVEL": "warning",
    }
    return load_balancer_config(home=home, env=env)


async def test_a_balancer_on_postgresql_keeps_nodes_models_and_keys_across_a_restart(
    tmp_path: Path, postgres_url: str
) -> None:
    first_config = postgres_config(tmp_path / "first", postgres_url)
    balancer: Balancer = await start(first_config)
    admin = first_config.admin_key_file.read_text().strip()
    try:
        async with open_channel(f"127.0.0.1:{balancer.port}", api_key=admin) as channel:
            registry = rgrpc.RegistryStub(channel)
            await registry.RegisterNode(rpb.RegisterNodeRequest(node_id="n1", address="127.0.0.1:1"))
            # Longer than the column: a clear invalid_request, not PostgreSQL's error as an internal one.
            with pytest.raises(grpc.aio.AioRpcError) as too_long:
                await registry.RegisterNode(
                    rpb.RegisterNodeRequest(node_id="n2", address="127.0.0.1:2", version="9" * 65)
                )
            assert error_from_rpc(too_long.value).code is ErrorCode.INVALID_REQUEST
            catalogue = [m.id for m in (await registry.ListModels(rpb.ListModelsRequest())).models]
            kept = await registry.CreateKey(rpb.CreateKeyRequest(name="frontend", scopes=[pb.SCOPE_API]))
            dropped = await registry.CreateKey(rpb.CreateKeyRequest(name="old", scopes=[pb.SCOPE_API]))
            await registry.RevokeKey(rpb.RevokeKeyRequest(key=dropped.key.id))
    finally:
        await balancer.stop()
    assert catalogue  # the packaged catalogue was seeded into PostgreSQL

    # Started again from an empty home: whatever it still knows came from the database.
    second_config = postgres_config(tmp_path / "second", postgres_url)
    balancer = await start(second_config)
    try:
        assert not second_config.admin_key_file.exists()  # keys exist, so no new admin key is made
        assert not (tmp_path / "first" / "llmlb.db").exists()
        assert not (tmp_path / "second" / "llmlb.db").exists()
        target = f"127.0.0.1:{balancer.port}"
        async with open_channel(target, api_key=admin) as channel:
            registry = rgrpc.RegistryStub(channel)
            nodes = (await registry.ListNodes(rpb.ListNodesRequest())).nodes
            assert [(n.id, n.address, n.state) for n in nodes] == [
                ("n1", "127.0.0.1:1", pb.NODE_STATE_OFFLINE)
            ]
            models = (await registry.ListModels(rpb.ListModelsRequest())).models
            assert [m.id for m in models] == catalogue
            keys = {k.id: k for k in (await registry.ListKeys(rpb.ListKeysRequest())).keys}
            assert not keys[kept.key.id].HasField("revoked_at")
            assert keys[dropped.key.id].HasField("revoked_at")

        async with open_channel(target, api_key=kept.secret) as channel:
            listed = await rgrpc.RegistryStub(channel).ListModels(rpb.ListModelsRequest())
            assert [m.id for m in listed.models] == catalogue
        async with open_channel(target, api_key=dropped.secret) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await rgrpc.RegistryStub(channel).ListModels(rpb.ListModelsRequest())
            assert error_from_rpc(refused.value).code is ErrorCode.UNAUTHORIZED
    finally:
        await balancer.stop()
