"""Traces a request leaves, recorded in this process by the SDK's in-memory exporter.

A real balancer with both doors open on 127.0.0.1, and a node made of the node's own ``Inference``
servicer and ``ModelPool`` (the pool tests' "counter" engine) behind the echo node's registration and
session. One request must give one trace: the door's span (child of the caller's ``traceparent`` when it
sends one), admission, the router's choice with its reasons, the node call, and on the node its call,
slot, load and runtime spans, with no prompt text and no secret in any attribute.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from balancer.server import Balancer, start
from common import tracing
from common.config import load_balancer_config, load_node_config
from common.errors import ErrorCode, LlmlbError
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import CHANNEL_OPTIONS, SERVER_OPTIONS
from devkit.echo_node import EchoNode
from node.cli import _show_config
from node.pool import ModelPool, PoolSettings
from node.runtimes.engines import Engines
from node.servicers.inference import NodeInferenceServicer
from tests.fixtures.eventually import eventually_async
from tests.unit.runtimes.test_pool import COUNTER, CPU, Resolved, counter_model

pytestmark = pytest.mark.timeout(60)

MODEL = "gemma-3-270m"  # a catalogue model, served here by the counter engine
PROMPT = "remember the violet harbour password"  # must never show up in a span
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


class WatchedServicer(NodeInferenceServicer):
    """The node's servicer, noting the ``traceparent`` each text call arrived with."""

    traceparents: list[str]

    async def Chat(self, request: ipb.ChatRequest, context: Any) -> AsyncIterator[ipb.TextChunk]:
        self._note(context)
        async for chunk in super().Chat(request, context):
            yield chunk

    async def Complete(self, request: ipb.CompleteRequest, context: Any) -> AsyncIterator[ipb.TextChunk]:
        self._note(context)
        async for chunk in super().Complete(request, context):
            yield chunk

    def _note(self, context: Any) -> None:
        self.traceparents.extend(v for k, v in context.invocation_metadata() if k == "traceparent")


class CounterNode(EchoNode):
    """The echo node's registration and session, with the node's real ``Inference`` servicer behind it."""

    def __init__(self, balancer: str, api_key: str, tmp_path: Path) -> None:
        super().__init__(balancer, api_key=api_key, models=(MODEL,))
        model = counter_model(tmp_path, MODEL, 100)

        async def resolve(model_id: str) -> Resolved:
            if model_id != MODEL:
                raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"model {model_id!r} is not here")
            return model

        self.pool = ModelPool(CPU, PoolSettings(slots_per_model=1), Engines([COUNTER]))
        self.servicer = WatchedServicer(self.pool, resolve, lambda: self.node_id)
        self.servicer.traceparents = []

    async def serve(self) -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        igrpc.add_InferenceServicer_to_server(self.servicer, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server


@dataclass
class Fleet:
    balancer: Balancer
    key: str
    node: CounterNode
    http: httpx.AsyncClient
    inference: Any  # an aio stub; grpc-stubs types stubs as synchronous
    spans: InMemorySpanExporter

    def trace(self, trace_id: int) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.context.trace_id == trace_id]

    def named(self, trace_id: int, name: str) -> ReadableSpan:
        found = [s for s in self.trace(trace_id) if s.name == name]
        assert len(found) == 1, f"{name}: {[s.name for s in self.trace(trace_id)]}"
        return found[0]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.install(provider)
    try:
        yield spans
    finally:
        tracing.install(None)
        provider.shutdown()


@pytest.fixture
async def fleet(tmp_path: Path, exporter: InMemorySpanExporter) -> AsyncIterator[Fleet]:
    home = tmp_path / "balancer"
    config = load_balancer_config(
        home=home, grpc_listen="127.0.0.1:0", http_listen="127.0.0.1:0", env={"LLMLB_HOME": str(home)}
    )
    balancer = await start(config)
    key = config.admin_key_file.read_text().strip()
    node = CounterNode(f"127.0.0.1:{balancer.port}", key, tmp_path)
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{balancer.http_port}",
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{balancer.port}", options=CHANNEL_OPTIONS)
    try:
        await node.start()
        yield Fleet(balancer, key, node, http, igrpc.InferenceStub(channel), exporter)
    finally:
        await channel.close(None)
        await http.aclose()
        await node.stop()
        await node.pool.close()
        await balancer.stop(grace=0)


def _parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _attribute_text(spans: list[ReadableSpan]) -> str:
    return " ".join(f"{k}={v!s}" for s in spans for k, v in (s.attributes or {}).items())


def _chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3, **extra}


async def test_one_http_request_is_one_trace_from_the_callers_traceparent_to_the_nodes_runtime(
    fleet: Fleet,
) -> None:
    reply = await fleet.http.post(
        "/v1/chat/completions", json=_chat_body(), headers={"traceparent": TRACEPARENT}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "1 2 3 "

    trace_id = int(TRACE_ID, 16)
    await eventually_async(lambda: len(fleet.trace(trace_id)) >= 8, 5, "the request's spans ended")
    door = fleet.named(trace_id, "http chat")
    assert door.kind is SpanKind.SERVER and _parent_of(door) == int(CLIENT_SPAN, 16)
    attributes = dict(door.attributes or {})
    assert attributes["llmlb.door"] == "http" and attributes["llmlb.route"] == "chat"
    assert attributes["llmlb.model"] == MODEL and attributes["llmlb.outcome"] == "ok"
    assert attributes["llmlb.node"] == fleet.node.node_id
    assert attributes["gen_ai.usage.output_tokens"] == 3

    admit = fleet.named(trace_id, "admit")
    route = fleet.named(trace_id, "route")
    call = fleet.named(trace_id, "node chat")
    assert _parent_of(admit) == _parent_of(route) == _parent_of(call) == door.context.span_id
    choice = dict(route.attributes or {})
    assert choice["llmlb.route.policy"] == "cache-aware"
    assert choice["llmlb.route.node"] == fleet.node.node_id
    assert choice["llmlb.route.reason"] == "miss"  # a first prompt: no node holds any of it yet
    assert choice["llmlb.route.tier"] == "ready" and choice["llmlb.route.candidates"] == 1
    assert int(str(choice["llmlb.route.prompt_chars"])) > 0 and choice["llmlb.route.held_chars"] == 0
    assert call.kind is SpanKind.CLIENT and dict(call.attributes or {})["llmlb.attempt"] == 1

    # The node's spans hang under the balancer's node call, in the same trace.
    assert fleet.node.servicer.traceparents == [f"00-{TRACE_ID}-{call.context.span_id:016x}-01"]
    served = fleet.named(trace_id, "xllm chat")
    assert served.kind is SpanKind.SERVER and _parent_of(served) == call.context.span_id
    assert dict(served.attributes or {})["llmlb.model"] == MODEL
    slot = fleet.named(trace_id, "slot")
    runtime = fleet.named(trace_id, "runtime")
    load = fleet.named(trace_id, "load")  # the first request loads the model
    assert _parent_of(slot) == _parent_of(runtime) == served.context.span_id
    assert _parent_of(load) == slot.context.span_id
    assert dict(runtime.attributes or {})["llmlb.engine"] == "counter"

    shown = _attribute_text(fleet.trace(trace_id))
    assert "violet" not in shown and fleet.key not in shown

    # The same conversation again: the router now says it chose the node for the prompt it holds.
    fleet.spans.clear()
    again = f"00-{'5' * 32}-{CLIENT_SPAN}-01"
    reply = await fleet.http.post("/v1/chat/completions", json=_chat_body(), headers={"traceparent": again})
    assert reply.status_code == 200
    await eventually_async(
        lambda: any(s.name == "route" for s in fleet.trace(int("5" * 32, 16))), 5, "the second route"
    )
    second = dict(fleet.named(int("5" * 32, 16), "route").attributes or {})
    assert second["llmlb.route.reason"] == "hit" and int(str(second["llmlb.route.held_chars"])) > 0


async def test_a_grpc_stream_honours_the_callers_traceparent_metadata(fleet: Fleet) -> None:
    request = ipb.CompleteRequest(model=MODEL, prompt=PROMPT, params=ipb.SamplingParams(max_tokens=2))
    metadata = (("authorization", f"Bearer {fleet.key}"), ("traceparent", TRACEPARENT))
    chunks = [c async for c in fleet.inference.Complete(request, timeout=10, metadata=metadata)]
    assert "".join(c.delta for c in chunks) == "1 2 "

    trace_id = int(TRACE_ID, 16)
    await eventually_async(lambda: len(fleet.trace(trace_id)) >= 7, 5, "the stream's spans ended")
    door = fleet.named(trace_id, "grpc complete")
    assert _parent_of(door) == int(CLIENT_SPAN, 16)
    assert dict(door.attributes or {})["llmlb.outcome"] == "ok"
    call = fleet.named(trace_id, "node complete")
    assert _parent_of(call) == door.context.span_id
    assert _parent_of(fleet.named(trace_id, "xllm complete")) == call.context.span_id
    assert "violet" not in _attribute_text(fleet.trace(trace_id))


async def test_a_request_without_a_traceparent_starts_a_trace_of_its_own(fleet: Fleet) -> None:
    reply = await fleet.http.post("/v1/chat/completions", json=_chat_body(stream=True))
    assert reply.status_code == 200
    await eventually_async(
        lambda: any(s.name == "xllm chat" for s in fleet.spans.get_finished_spans()), 5, "the node's span"
    )
    door = next(s for s in fleet.spans.get_finished_spans() if s.name == "http chat")
    assert door.parent is None
    names = {s.name for s in fleet.trace(door.context.trace_id)}
    assert {"http chat", "admit", "route", "node chat", "xllm chat", "slot", "runtime"} <= names


async def test_a_refused_request_ends_its_spans_with_the_error_code_and_no_node_call(fleet: Fleet) -> None:
    reply = await fleet.http.post(
        "/v1/chat/completions", json=_chat_body(max_tokens=-1), headers={"traceparent": TRACEPARENT}
    )
    assert reply.status_code == 400
    trace_id = int(TRACE_ID, 16)
    await eventually_async(
        lambda: any(s.name == "http chat" for s in fleet.trace(trace_id)), 5, "the door's span"
    )
    door = fleet.named(trace_id, "http chat")
    admit = fleet.named(trace_id, "admit")
    for span in (door, admit):
        assert span.status.status_code is StatusCode.ERROR
        assert dict(span.attributes or {})["llmlb.outcome"] == "invalid_request"
    assert {s.name for s in fleet.trace(trace_id)} == {"http chat", "admit"}


async def test_each_node_a_failing_request_tried_is_a_node_call_span_with_its_attempt_and_error(
    fleet: Fleet,
) -> None:
    await fleet.node.stop()  # two nodes that fail instead: the request is tried on both
    failing = [EchoNode(f"127.0.0.1:{fleet.balancer.port}", api_key=fleet.key) for _ in range(2)]
    try:
        for node in failing:
            node.fail_with = ErrorCode.INTERNAL
            await node.start()
        reply = await fleet.http.post(
            "/v1/chat/completions", json=_chat_body(), headers={"traceparent": TRACEPARENT}
        )
        assert reply.status_code == 500
        trace_id = int(TRACE_ID, 16)
        await eventually_async(
            lambda: any(s.name == "http chat" for s in fleet.trace(trace_id)), 5, "the door"
        )
    finally:
        for node in failing:
            await node.stop()
    calls = sorted(
        (dict(s.attributes or {}) for s in fleet.trace(trace_id) if s.name == "node chat"),
        key=lambda a: str(a["llmlb.attempt"]),
    )
    internal = ErrorCode.INTERNAL.value
    assert [(a["llmlb.attempt"], a["llmlb.outcome"]) for a in calls] == [(1, internal), (2, internal)]
    assert {a["llmlb.node"] for a in calls} == {n.node_id for n in failing}
    routes = [dict(s.attributes or {}) for s in fleet.trace(trace_id) if s.name == "route"]
    chosen = sorted(int(str(r["llmlb.route.excluded"])) for r in routes if "llmlb.route.node" in r)
    assert chosen == [0, 1]  # the second try left the first node out
    # A third look finds no node left to try, and ends with the last node's error.
    assert [r["llmlb.outcome"] for r in routes if "llmlb.route.node" not in r] == [internal]
    assert dict(fleet.named(trace_id, "http chat").attributes or {})["llmlb.outcome"] == internal


async def test_with_tracing_off_no_span_is_made_and_no_trace_context_goes_to_the_node(
    fleet: Fleet, exporter: InMemorySpanExporter
) -> None:
    tracing.install(None)
    reply = await fleet.http.post(
        "/v1/chat/completions", json=_chat_body(), headers={"traceparent": TRACEPARENT}
    )
    assert reply.status_code == 200
    assert exporter.get_finished_spans() == ()
    assert fleet.node.servicer.traceparents == []


# -- turning traces on and off ---------------------------------------------------------------------------

ENDPOINT = "http://127.0.0.1:4317"


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A process environment without OTEL_* variables, restored afterwards (``configure`` writes to it)."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    yield monkeypatch
    tracing.shutdown()


def _configured(monkeypatch: pytest.MonkeyPatch, service: str, **otel: str) -> TracerProvider | None:
    for name, value in otel.items():
        monkeypatch.setenv(name, value)  # undone afterwards, whatever configure sets from them
    return tracing.configure(service, otel)


@pytest.mark.parametrize(
    "otel",
    [
        {},
        {"OTEL_SERVICE_NAME": "edge"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_without_an_otlp_endpoint_or_with_the_sdk_disabled_tracing_stays_off(
    otel_env: pytest.MonkeyPatch, otel: dict[str, str]
) -> None:
    assert _configured(otel_env, tracing.BALANCER_SERVICE, **otel) is None
    assert not tracing.enabled()
    assert tracing.start("x").is_recording() is False
    assert tracing.from_headers({"traceparent": TRACEPARENT}) is None


def test_an_otlp_endpoint_turns_tracing_on_named_after_the_process_unless_otel_names_it(
    otel_env: pytest.MonkeyPatch,
) -> None:
    for endpoint in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        provider = _configured(otel_env, tracing.NODE_SERVICE, **{endpoint: ENDPOINT})
        assert provider is not None and tracing.enabled()
        assert provider.resource.attributes["service.name"] == "xllm"
        tracing.shutdown()
        otel_env.delenv(endpoint)
    provider = _configured(
        otel_env, tracing.BALANCER_SERVICE, OTEL_EXPORTER_OTLP_ENDPOINT=ENDPOINT, OTEL_SERVICE_NAME="edge-1"
    )
    assert provider is not None and provider.resource.attributes["service.name"] == "edge-1"


def test_otel_settings_come_from_the_environment_over_the_env_file_and_bad_ones_stop_the_start(
    tmp_path: Path,
) -> None:
    (tmp_path / ".env").write_text(f"OTEL_EXPORTER_OTLP_ENDPOINT={ENDPOINT}\nOTEL_SERVICE_NAME=from-file\n")
    env = {"LLMLB_HOME": str(tmp_path), "OTEL_SERVICE_NAME": "from-env", "LLMLB_X": "not otel"}
    otel = dict(load_balancer_config(home=tmp_path, env=env).otel)
    assert otel == {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SERVICE_NAME": "from-env"}
    assert dict(load_node_config(home=tmp_path, env=env).otel) == otel
    for bad in ({"OTEL_TRACES_EXPORTER": "zipkin"}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}):
        with pytest.raises(ValueError, match="OTEL_"):
            load_balancer_config(home=tmp_path, env={**env, **bad})


def test_a_long_tracestate_is_dropped_and_only_w3c_trace_context_is_read(
    exporter: InMemorySpanExporter,
) -> None:
    carried = tracing.from_headers(
        {"traceparent": TRACEPARENT, "tracestate": "k=" + "v" * 600, "baggage": "user=alice"}
    )
    span = tracing.start("x", parent=carried)
    sent = dict(tracing.metadata(span))
    tracing.finish(span)
    assert set(sent) == {"traceparent"} and sent["traceparent"].startswith(f"00-{TRACE_ID}-")
    kept = tracing.from_metadata(lambda: (("traceparent", TRACEPARENT), ("tracestate", "k=v")))
    span = tracing.start("y", parent=kept)
    assert dict(tracing.metadata(span))["tracestate"] == "k=v"
    tracing.finish(span)


def test_xllm_config_shows_the_otel_settings_but_not_the_collectors_headers(tmp_path: Path) -> None:
    env = {
        "LLMLB_HOME": str(tmp_path),
        "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer collector-s3cret",
    }
    config = load_node_config(home=tmp_path, env=env)
    shown = _show_config(config)["otel"]
    assert shown == {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_HEADERS": "set"}
    assert "collector-s3cret" not in repr(config)


BAD_TRACEPARENTS = [
    "garbage",
    f"00-{'0' * 32}-{CLIENT_SPAN}-01",  # an all-zero trace id is invalid
    f"00-{TRACE_ID}-{'0' * 16}-01",  # so is an all-zero parent span
    f"ff-{TRACE_ID}-{CLIENT_SPAN}-01",  # version ff is forbidden
    f"00-{TRACE_ID[:-1]}Z-{CLIENT_SPAN}-01",  # not hex
    f"00-{TRACE_ID}-{CLIENT_SPAN}",  # no flags
    "00-" + "a" * 3000,  # long and shapeless
]


async def test_a_malformed_traceparent_on_either_door_is_ignored_and_the_request_starts_its_own_trace(
    fleet: Fleet,
) -> None:
    for bad in BAD_TRACEPARENTS:
        fleet.spans.clear()
        reply = await fleet.http.post("/v1/chat/completions", json=_chat_body(), headers={"traceparent": bad})
        assert reply.status_code == 200, (bad, reply.text)
        request = ipb.CompleteRequest(model=MODEL, prompt=PROMPT, params=ipb.SamplingParams(max_tokens=2))
        metadata = (("authorization", f"Bearer {fleet.key}"), ("traceparent", bad))
        chunks = [c async for c in fleet.inference.Complete(request, timeout=10, metadata=metadata)]
        assert "".join(c.delta for c in chunks) == "1 2 ", bad

        def doors() -> list[Any]:
            return [s for s in fleet.spans.get_finished_spans() if s.name in ("http chat", "grpc complete")]

        await eventually_async(lambda: len(doors()) == 2, 5, "both doors' spans")
        for door in doors():
            assert door.parent is None, (bad, door.name)  # a root: nothing of the bad header was kept
            assert door.context.trace_id not in (0, int(TRACE_ID, 16)), (bad, door.name)
