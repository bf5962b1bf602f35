"""The HTTP door of an in-process balancer, over real TCP, in front of echo nodes (real gRPC nodes).

Answers in OpenAI's shapes for the official client, streams that stop their node when the client
leaves, errors after the first chunk as SSE error events, and a full queue as 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from balancer.server import Balancer, start
from common.config import load_balancer_config
from common.errors import ErrorCode
from devkit.echo_node import EchoNode

pytestmark = pytest.mark.timeout(60)
MODEL = "gemma-3-270m"
PROMPT = "one two three four five six"


@dataclass
class Door:
    balancer: Balancer
    key: str
    http: httpx.AsyncClient
    nodes: list[EchoNode]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.balancer.http_port}"

    def openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, timeout=10)

    def outstanding(self) -> int:
        """Calls the router has in flight on any node."""
        return sum(s.outstanding for s in self.balancer.parts.router.stats().values())


StartDoor = Callable[..., Awaitable[Door]]


@pytest.fixture
async def start_door(tmp_path: Path) -> AsyncIterator[StartDoor]:
    started: list[Door] = []
    nodes: list[EchoNode] = []

    async def make(nodes_knobs: tuple[dict[str, Any], ...] = ({},), **env: str) -> Door:
        home = tmp_path / f"balancer{len(started)}"
        config = load_balancer_config(
            home=home,
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            env={"LLMLB_HOME": str(home), **env},
        )
        balancer = await start(config)
        key = config.admin_key_file.read_text().strip()
        http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{balancer.http_port}",
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        )
        door = Door(balancer, key, http, [])
        started.append(door)
        for knobs in nodes_knobs:
            node = EchoNode(f"127.0.0.1:{balancer.port}", api_key=key)
            for name, value in knobs.items():  # every knob may change at any time
                setattr(node, name, value)
            nodes.append(node)
            door.nodes.append(node)
            await node.start()
        return door

    yield make
    for node in nodes:
        await node.stop()
    for door in started:
        await door.http.aclose()
        await door.balancer.stop(grace=0)


async def eventually(check: Callable[[], bool], within_s: float = 5.0) -> float:
    """Seconds until ``check`` holds; fails after ``within_s``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within_s, "condition never held"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_the_openai_client_chats_completes_and_embeds_through_the_door(start_door: StartDoor) -> None:
    door = await start_door()
    client = door.openai()
    chat = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}])
    assert chat.choices[0].message.content == PROMPT  # the echo node sends it back word by word
    assert (
        chat.choices[0].finish_reason == "stop" and chat.usage is not None and chat.usage.total_tokens == 12
    )
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    completion = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert completion.choices[0].text == "one two" and completion.choices[0].finish_reason == "length"
    embedded = await client.embeddings.create(model=MODEL, input=["a b", "c"])
    assert [d.embedding for d in embedded.data] == [[3.0, 2.0, 1.0], [1.0, 1.0, 1.0]]

    raw = await door.http.post(
        "/v1/chat/completions",
        headers={"x-request-id": "trace-42"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert raw.headers["x-request-id"] == "trace-42" and raw.json()["id"] == "chatcmpl-trace-42"
    assert raw.headers["x-llmlb-node"].startswith("echo-")


async def test_n_choices_and_logprobs_are_joined_and_streamed_per_choice(start_door: StartDoor) -> None:
    door = await start_door()
    client = door.openai()
    asked: list[Any] = [{"role": "user", "content": PROMPT}]
    chat = await client.chat.completions.create(
        model=MODEL, messages=asked, max_tokens=2, n=3, logprobs=True, top_logprobs=2
    )
    assert [(c.index, c.message.content, c.finish_reason) for c in chat.choices] == [
        (i, "one two", "length") for i in range(3)
    ]
    assert chat.usage is not None and (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (6, 6)
    for choice in chat.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert [t.token for t in choice.logprobs.content] == ["one", " two"]
        assert [t.token for t in choice.logprobs.content[1].top_logprobs] == [" two", " two~1"]

    stream = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, n=2, logprobs=1, stream=True
    )
    texts = {0: "", 1: ""}
    offsets: dict[int, list[int]] = {0: [], 1: []}
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.logprobs is not None:
                offsets[c.index] += c.logprobs.text_offset or []
    assert texts == {0: "one two", 1: "one two"} and offsets == {0: [0, 3], 1: [0, 3]}


async def test_a_client_leaving_mid_stream_cancels_the_node_call_at_once(start_door: StartDoor) -> None:
    door = await start_door(({"chunk_delay_s": 5.0},))  # one chunk, then a long pause
    [node] = door.nodes
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    async with door.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if '"content":"one"' in line:
                break
    left = time.monotonic()
    await asyncio.wait_for(node.cancelled.wait(), 2.0)  # not after the node's next chunk, 5 s on
    await eventually(lambda: door.outstanding() == 0)
    assert time.monotonic() - left < 2.0


async def test_the_node_learns_of_a_departed_client_before_the_first_chunk(start_door: StartDoor) -> None:
    door = await start_door(({"delay_s": 30.0},))  # the node thinks for a long time before answering
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    for request in (
        door.http.post("/v1/chat/completions", json=body),
        door.http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}),
    ):
        task = asyncio.ensure_future(request)
        await eventually(lambda: door.outstanding() == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await eventually(lambda: door.outstanding() == 0, within_s=2.0)
    scrape = (await door.http.get("/metrics")).text
    assert (
        'llmlb_requests_total{code="cancelled",door="http",model="gemma-3-270m",route="chat"} 1.0' in scrape
    )
    assert (
        'llmlb_requests_total{code="cancelled",door="http",model="gemma-3-270m",route="complete"} 1.0'
        in scrape
    )


async def test_an_error_after_the_first_chunk_is_an_sse_error_event(start_door: StartDoor) -> None:
    door = await start_door(({"fail_with": ErrorCode.INTERNAL, "fail_after_chunks": 2},))
    body = {"model": MODEL, "prompt": PROMPT, "stream": True}
    response = await door.http.post("/v1/completions", json=body)
    assert response.status_code == 200  # the status was sent with the first chunk
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert [e["choices"][0]["text"] for e in events[:2]] == ["one", " two"]
    assert events[-1]["error"]["code"] == "internal_error" and "[DONE]" not in response.text
    with pytest.raises(openai.APIError) as failed:
        stream = await door.openai().completions.create(model=MODEL, prompt=PROMPT, stream=True)
        async for _ in stream:
            pass
    assert "fails as told" in failed.value.message


async def test_an_error_before_the_first_chunk_is_a_json_error_with_its_status(start_door: StartDoor) -> None:
    door = await start_door(({"fail_with": ErrorCode.TIMEOUT},))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    response = await door.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 504 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "timeout"


async def test_a_full_queue_is_429_with_retry_after_and_the_openai_client_sees_a_rate_limit(
    start_door: StartDoor,
) -> None:
    door = await start_door(LLMLB_NODE_MAX_INFLIGHT="1", LLMLB_QUEUE_SIZE="0")
    [node] = door.nodes
    node.hold()  # the only node's only slot stays taken by the first request
    body = {"model": MODEL, "prompt": "x"}
    first = asyncio.ensure_future(door.http.post("/v1/completions", json={**body, "prompt": PROMPT}))
    await eventually(lambda: door.outstanding() == 1)
    busy = await door.http.post("/v1/completions", json=body)
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
    assert int(busy.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError):
        await door.openai().completions.create(model=MODEL, prompt="x")
    node.release()
    assert (await first).json()["choices"][0]["text"] == PROMPT
