"""A real `xllm serve` process with its Prometheus door open: what a scrape shows after real requests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
import pytest

from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from devkit.fake_hub import FakeHub
from devkit.model_files import CACHE, ModelFiles
from devkit.ports import free_port
from tests.integration.conftest import DIRECT_TOKEN, BalancerProcess, NodeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
NodeFactory = Callable[..., NodeProcess]
BalancerFactory = Callable[..., BalancerProcess]


def metrics_address(node: NodeProcess) -> str:
    """The address the node logged for /metrics (it was asked for port 0)."""
    for line in node.log().splitlines():
        if '"node.metrics_listening"' in line:
            return str(json.loads(line)["address"])
    raise AssertionError(f"no node.metrics_listening in the node log:\n{node.log()}")


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return str(reply.read().decode())


def test_the_metrics_endpoint_shows_finished_requests_tokens_and_ready_models(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, gemma: ModelFiles
) -> None:
    balancer = balancer_factory(hub)
    node = node_factory(
        balancer,
        hub,
        "--shared-dir",
        str(CACHE),
        "--metrics-listen",
        "127.0.0.1:0",
        XLLM_AUTH_TOKEN=DIRECT_TOKEN,
    )
    address = metrics_address(node)
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")

    before = scrape(address)
    assert 'xllm_models{state="ready"} 0.0' in before
    assert "xllm_requests_total{" not in before

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
        with pytest.raises(grpc.RpcError):
            list(stub.Complete(ipb.CompleteRequest(model="acme/nothing", prompt="x"), timeout=10))
    usage = chunks[-1].usage

    text = scrape(address)
    assert 'xllm_requests_total{code="ok",door="grpc",model="gemma-3-270m",route="complete"} 1.0' in text
    assert 'xllm_requests_total{code="model_not_found",door="grpc",model="",route="complete"} 1.0' in text
    assert 'xllm_models{state="ready"} 1.0' in text
    assert (
        f'xllm_tokens_total{{kind="completion",model="gemma-3-270m"}} {float(usage.completion_tokens)}'
        in text
    )
    assert f'xllm_tokens_total{{kind="prompt",model="gemma-3-270m"}} {float(usage.prompt_tokens)}' in text
    assert 'xllm_time_to_first_token_seconds_count{route="complete"} 1.0' in text
    assert "xllm_active_requests 0.0" in text and "xllm_queue_depth 0.0" in text

    assert node.stop() == 0
    with pytest.raises(urllib.error.URLError):  # the door closed with the node
        scrape(address)


def test_xllm_metrics_listen_opens_the_door_at_the_address_given(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory
) -> None:
    balancer = balancer_factory(hub)
    port = free_port()
    node = node_factory(balancer, hub, XLLM_METRICS_LISTEN=f"127.0.0.1:{port}")
    assert metrics_address(node) == f"127.0.0.1:{port}"
    text = scrape(f"127.0.0.1:{port}")
    for name in ("xllm_downloads_total", "xllm_download_bytes_total", "xllm_requests_total"):
        assert f"# TYPE {name} counter" in text
    assert 'xllm_models{state="downloading"} 0.0' in text
