"""A real `xllm serve` process running the packaged models: resolution, loading and inference together.

The models reach the node the way an operator would give them: a shared dir holding
``<model-id>/<file>`` (the test model cache is laid out that way), used in place. The balancer seeds
them from its packaged catalogue, so the node verifies each file against the catalogue's sha256.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
from devkit.fake_hub import FakeHub
from devkit.model_files import CACHE, ModelFiles
from tests.fixtures.eventually import eventually
from tests.integration.conftest import DIRECT_TOKEN, BalancerProcess, NodeProcess

pytestmark = pytest.mark.slow
NodeFactory = Callable[..., NodeProcess]


def test_a_node_serves_chat_from_a_shared_dir_and_the_balancer_sees_it_ready(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory, gemma: ModelFiles, whisper: ModelFiles
) -> None:
    node = node_factory(balancer, hub, "--shared-dir", str(CACHE), XLLM_AUTH_TOKEN=DIRECT_TOKEN)
    with node.direct_channel() as channel:
        stub = igrpc.InferenceStub(channel)
        chunks = list(
            stub.Complete(
                ipb.CompleteRequest(
                    model="gemma-3-270m",
                    prompt="One, two, three, four,",
                    params=ipb.SamplingParams(max_tokens=6, temperature=0.0),
                ),
                timeout=120,
            )
        )
        assert "".join(c.delta for c in chunks).strip()
        assert chunks[-1].finish_reason in (ipb.FINISH_REASON_LENGTH, ipb.FINISH_REASON_STOP)
        assert chunks[-1].usage.completion_tokens > 0
        assert chunks[-1].node_id == node.node_id

        with pytest.raises(grpc.RpcError) as unknown:
            list(stub.Complete(ipb.CompleteRequest(model="acme/nothing", prompt="x"), timeout=5))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as lacking:  # a speech-to-text model cannot complete text
            list(stub.Complete(ipb.CompleteRequest(model="whisper-base", prompt="x"), timeout=60))
        assert lacking.value.code() == grpc.StatusCode.NOT_FOUND

    # Used in place: nothing of the model was copied into the node's models dir.
    assert not [p for p in node.models_dir.rglob("*.gguf")]
    eventually(
        lambda: (
            balancer.registry.GetModelStatus(rpb.GetModelStatusRequest(model_id="gemma-3-270m")).status
            == pb.MODEL_STATE_READY
        ),
        10,
        "gemma-3-270m ready at the balancer",
        every=0.1,
    )
    listed = balancer.registry.GetModel(rpb.GetModelRequest(model_id="gemma-3-270m"))
    assert listed.ready
    assert [(n.node_id, n.ready) for n in listed.nodes] == [(node.node_id, True)]
    registered = next(
        n for n in balancer.registry.ListNodes(rpb.ListNodesRequest()).nodes if n.id == node.node_id
    )
    assert "llama.cpp" in registered.runtimes

    # Deleting the model unloads it on the node; the shared copy stays where it is.
    balancer.registry.DeleteModel(rpb.DeleteModelRequest(model_id="gemma-3-270m"))
    eventually(
        lambda: not any(n.model_id == "gemma-3-270m" for n in registered_models(balancer, node.node_id)),
        5,
        "the node no longer reporting gemma-3-270m",
        every=0.1,
    )
    assert next(iter(gemma.paths.values())).exists()


def registered_models(balancer: BalancerProcess, node_id: str) -> list[pb.ModelNodeStatus]:
    for node in balancer.registry.ListNodes(rpb.ListNodesRequest()).nodes:
        if node.id == node_id:
            return list(node.models)
    return []
