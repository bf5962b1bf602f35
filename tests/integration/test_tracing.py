"""Traces from real processes: a balancer and an `xllm` node (gemma) export OTLP to a collector stand-in.

One request through each door, sent with a client ``traceparent``, must arrive at the collector as one
trace: the balancer's spans (service ``llmlb``) under the client's span, the node's (service ``xllm``)
under the balancer's node call, across the two processes.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from devkit.fake_hub import FakeHub
from devkit.model_files import CACHE, ModelFiles
from tests.fixtures.eventually import eventually
from tests.fixtures.otlp_collector import ExportedSpan, OtlpCollector
from tests.integration.conftest import BalancerProcess, NodeProcess, wait_online

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
NodeFactory = Callable[..., NodeProcess]
BalancerFactory = Callable[..., BalancerProcess]
CLIENT_SPAN = "00f067aa0ba902b7"


def _one(spans: list[ExportedSpan], service: str, name: str) -> ExportedSpan:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, [(s.service, s.name) for s in spans]
    return found[0]


def _assert_one_trace(spans: list[ExportedSpan], door: str, route: str) -> None:
    request = _one(spans, "llmlb", f"{door} {route}")
    assert request.parent_id == CLIENT_SPAN
    assert request.attributes["llmlb.outcome"] == "ok" and request.attributes["llmlb.model"] == "gemma-3-270m"
    route_span = _one(spans, "llmlb", "route")
    assert route_span.parent_id == request.span_id
    assert route_span.attributes["llmlb.route.policy"] == "cache-aware"
    call = _one(spans, "llmlb", f"node {route}")
    assert call.parent_id == request.span_id
    served = _one(spans, "xllm", f"xllm {route}")
    assert served.parent_id == call.span_id  # across the processes, through the call's metadata
    assert route_span.attributes["llmlb.route.node"] == call.attributes["llmlb.node"]
    runtime = _one(spans, "xllm", "runtime")
    assert runtime.parent_id == served.span_id and runtime.attributes["llmlb.engine"] == "llama.cpp"


def test_one_request_through_either_door_is_one_trace_across_the_balancer_and_node_processes(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, gemma: ModelFiles
) -> None:
    with OtlpCollector() as collector:
        otel = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within a tenth of a second, not the default 5 s
        }
        balancer = balancer_factory(hub, **otel)
        node = node_factory(balancer, hub, "--shared-dir", str(CACHE), **otel)
        wait_online(balancer, node)

        http_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        reply = httpx.post(
            f"{balancer.http_url}/v1/chat/completions",
            json={"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            headers={
                "authorization": f"Bearer {balancer.admin_key}",
                "traceparent": f"00-{http_trace}-{CLIENT_SPAN}-01",
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text

        grpc_trace = "5" * 32
        assert balancer.channel is not None  # presents the admin key
        stub = igrpc.InferenceStub(balancer.channel)
        request = ipb.CompleteRequest(
            model="gemma-3-270m", prompt="One, two,", params=ipb.SamplingParams(max_tokens=2)
        )
        list(
            stub.Complete(
                request, timeout=120, metadata=(("traceparent", f"00-{grpc_trace}-{CLIENT_SPAN}-01"),)
            )
        )

        def whole(trace_id: str, door: str, route: str) -> list[ExportedSpan] | None:
            """The trace once both processes exported every span it is checked for (in batches)."""
            spans = collector.spans(trace_id)
            want = {f"{door} {route}", "route", f"node {route}", f"xllm {route}", "runtime"}
            return spans if want <= {s.name for s in spans} else None

        describe = lambda: balancer.log()[-3000:] + node.log()[-3000:]  # noqa: E731
        _assert_one_trace(
            eventually(lambda: whole(http_trace, "http", "chat"), 20, "the HTTP trace", describe=describe),
            "http",
            "chat",
        )
        _assert_one_trace(
            eventually(
                lambda: whole(grpc_trace, "grpc", "complete"), 20, "the gRPC trace", describe=describe
            ),
            "grpc",
            "complete",
        )
