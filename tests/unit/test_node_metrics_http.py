"""The node's /metrics door on a real socket on 127.0.0.1: what a Prometheus scraper gets back."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator, Iterable

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from common.config import HttpLimits
from common.metrics import NodeMetrics
from node.metrics_http import MetricsHttpServer

pytestmark = pytest.mark.timeout(20)


def gauges() -> dict[str, tuple[str, dict[tuple[str, ...], float]]]:
    return {
        "xllm_models": ("Models on this node, by state.", {("ready",): 1.0, ("loading",): 0.0}),
        "xllm_queue_depth": ("Requests waiting.", {(): 3.0}),
        "xllm_active_requests": ("Requests running.", {(): 1.0}),
    }


@pytest.fixture
def metrics() -> NodeMetrics:
    return NodeMetrics(gauges)


@pytest.fixture
async def server(metrics: NodeMetrics) -> AsyncIterator[MetricsHttpServer]:
    door = MetricsHttpServer(metrics.registry)
    await door.start("127.0.0.1:0")
    try:
        yield door
    finally:
        await door.stop()


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Sends one raw HTTP request; returns status, headers (lower-case names) and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def get(path: str, method: str = "GET", headers: str = "Connection: close\r\n") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n{headers}\r\n".encode()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer of a kept-alive connection: status, headers (lower-case names), body by its length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return int(status_line.split()[1]), headers, body


async def test_port_zero_binds_a_free_port_and_reports_it(server: MetricsHttpServer) -> None:
    assert server.port > 0
    assert server.address == f"127.0.0.1:{server.port}"


async def test_get_metrics_returns_the_prometheus_text_with_counters_and_scrape_time_gauges(
    server: MetricsHttpServer, metrics: NodeMetrics
) -> None:
    metrics.observe("grpc", "chat", "gemma-3-270m", "ok", 0.4)
    metrics.first_token("chat", 0.05)
    metrics.tokens("gemma-3-270m", 7, 12)

    status, headers, body = await request(server.port, get("/metrics"))

    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    text = body.decode()
    assert 'xllm_requests_total{code="ok",door="grpc",model="gemma-3-270m",route="chat"} 1.0' in text
    assert 'xllm_tokens_total{kind="completion",model="gemma-3-270m"} 12.0' in text
    assert 'xllm_time_to_first_token_seconds_count{route="chat"} 1.0' in text
    assert 'xllm_models{state="ready"} 1.0' in text
    assert "xllm_queue_depth 3.0" in text
    assert "xllm_active_requests 1.0" in text


async def test_each_scrape_reads_the_current_values(server: MetricsHttpServer, metrics: NodeMetrics) -> None:
    _, _, before = await request(server.port, get("/metrics"))
    metrics.observe("grpc", "embed", "m", "model_not_found", 0.01)
    _, _, after = await request(server.port, get("/metrics?x=1"))
    line = 'xllm_requests_total{code="model_not_found",door="grpc",model="m",route="embed"} 1.0'
    assert line not in before.decode()
    assert line in after.decode()


async def test_head_sends_the_headers_without_the_body(server: MetricsHttpServer) -> None:
    status, headers, body = await request(server.port, get("/metrics", "HEAD"))
    assert status == 200
    assert int(headers["content-length"]) > 0
    assert body == b""


async def test_other_paths_are_not_found_and_other_methods_not_allowed(server: MetricsHttpServer) -> None:
    status, _, body = await request(server.port, get("/"))
    assert status == 404 and b"/metrics" in body
    status, headers, _ = await request(server.port, get("/metrics", "POST"))
    assert status == 405 and headers["allow"] == "GET, HEAD"


async def test_a_malformed_request_gets_400(server: MetricsHttpServer) -> None:
    status, _, _ = await request(server.port, b"hello\r\n\r\n")
    assert status == 400


async def test_a_head_over_the_scrape_limit_gets_431_with_the_house_error(server: MetricsHttpServer) -> None:
    status, headers, body = await request(
        server.port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    )
    assert status == 431 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "headers_too_large"


class FailsOnce(Collector):
    """``xllm_up``, after one scrape that fails as if the node's state could not be read."""

    def __init__(self) -> None:
        self.calls = 0

    def collect(self) -> Iterable[GaugeMetricFamily]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("state unavailable")
        yield GaugeMetricFamily("xllm_up", "Whether the node answers.", value=1.0)


async def test_a_failing_scrape_answers_500_and_the_door_keeps_serving() -> None:
    registry = CollectorRegistry()
    registry.register(FailsOnce())
    door = MetricsHttpServer(registry)
    await door.start("127.0.0.1:0")
    try:
        assert (await request(door.port, get("/metrics")))[0] == 500
        status, _, body = await request(door.port, get("/metrics"))
        assert status == 200 and "xllm_up 1.0" in body.decode()
    finally:
        await door.stop()


async def test_a_scraper_keeps_its_connection_open_from_one_scrape_to_the_next(
    server: MetricsHttpServer, metrics: NodeMetrics
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(get("/metrics", headers=""))
        first = await read_answer(reader)
        metrics.observe("grpc", "chat", "m", "ok", 0.1)
        writer.write(get("/metrics", headers=""))
        second = await read_answer(reader)
    finally:
        writer.close()
    assert first[0] == second[0] == 200
    line = 'xllm_requests_total{code="ok",door="grpc",model="m",route="chat"} 1.0'
    assert line not in first[2].decode() and line in second[2].decode()


async def test_a_scraper_that_accepts_gzip_gets_the_exposition_compressed(server: MetricsHttpServer) -> None:
    status, headers, body = await request(
        server.port, get("/metrics", headers="Accept-Encoding: gzip\r\nConnection: close\r\n")
    )
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert "xllm_queue_depth 3.0" in gzip.decompress(body).decode()


async def test_name_filters_narrow_the_scrape_to_the_series_asked_for(
    server: MetricsHttpServer, metrics: NodeMetrics
) -> None:
    metrics.observe("grpc", "chat", "m", "ok", 0.1)
    metrics.tokens("m", 7, 12)
    _, _, body = await request(server.port, get("/metrics?name[]=xllm_requests_total"))
    text = body.decode()
    assert 'xllm_requests_total{code="ok",door="grpc",model="m",route="chat"} 1.0' in text
    assert "xllm_tokens_total" not in text and "process_" not in text


async def test_a_half_sent_head_is_closed_after_the_header_timeout(metrics: NodeMetrics) -> None:
    door = MetricsHttpServer(metrics.registry, HttpLimits(header_timeout_s=0.5))
    await door.start("127.0.0.1:0")
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
    try:
        writer.write(get("/metrics")[:20])
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.4 <= time.monotonic() - started < 3
    finally:
        writer.close()
        await door.stop()


async def test_stop_closes_the_port_even_with_an_idle_connection_open(metrics: NodeMetrics) -> None:
    door = MetricsHttpServer(metrics.registry)
    await door.start("127.0.0.1:0")
    _, idle = await asyncio.open_connection("127.0.0.1", door.port)  # connects, never sends a request
    try:
        await asyncio.wait_for(door.stop(), 2)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", door.port)
    finally:
        idle.close()


async def test_a_port_in_use_fails_to_start(server: MetricsHttpServer, metrics: NodeMetrics) -> None:
    with pytest.raises(OSError):
        await MetricsHttpServer(metrics.registry).start(f"127.0.0.1:{server.port}")
