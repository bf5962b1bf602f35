"""Prefix-cache-aware routing: multi-turn chats with long system prompts through the HTTP door, against two
real gemma-3-270m nodes, with each routing policy side by side in one run.

Every policy gets a fresh balancer (``LLMLB_ROUTING``) and two fresh ``xllm serve`` nodes (empty prefix
caches), all on 127.0.0.1, the packaged GGUF on a shared dir used in place, the fake hub the only origin.
Four workloads each:

- **conversations**: 12 conversations of 4 turns, each with its own ~600-token system prompt, 2 at a
  time, back to back (the shape of the measurement in the issue); a turn's answer goes into the next
  turn's history.
- **chatting**: the same, 4 at a time, with a 1-2 s pause before each later turn (the user reading and
  typing): more conversations than nodes, and nodes that are often idle when a turn arrives.
- **skewed**: 8 clients; three of four requests share one hot system prompt (single turns with fresh
  questions), the rest use one of 8 others. Shows the guard: no node far above the mean load.
- **fresh**: every prompt new (nothing shared), 2 at a time: cache-aware routing should cost nothing.

Then power-of-two on nodes with the prefix cache off (each context reuses only its own last prompt, as
nodes did before), and chatting through two replicas on one PostgreSQL (each turn to the other one).
TTFT is the time to the first streamed content; greedy sampling (temperature 0), 16 tokens per answer.
Each node runs its engine on half the machine's cores (``XLLM_ENGINE_THREADS``), since both share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc.aio
import httpx

from common.channels import bearer_metadata
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import CHANNEL_OPTIONS
from devkit import packaged_models
from devkit.fake_hub import FakeHub
from devkit.model_files import CACHE, catalogue_model
from devkit.node_process import NodeProcess
from devkit.postgres import PostgresServer, find_bin_dir
from devkit.replica_process import ReplicaProcess, create_key

MODEL = packaged_models.GEMMA
J = TypeVar("J")
CONVERSATIONS = 12
TURNS = 4
AT_ONCE = 2
CHAT_AT_ONCE = 4  # "chatting": conversations at a time...
CHAT_THINK_S = (1.0, 2.0)  # ...and the pause before each later turn, drawn uniformly
SKEW_CLIENTS = 8
SKEW_REQUESTS = 32
SKEW_HOT = 0.75  # share of skewed requests on the hot system prompt
FRESH_REQUESTS = 16
MAX_TOKENS = 16
SYSTEM_SENTENCES = 25  # ~600 gemma tokens
START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 300.0
GOAL_TTFT = 4.0  # later-turn TTFT p50: power-of-two / cache-aware at least this
GOAL_RATE = 1.5  # requests/s: cache-aware / power-of-two at least this
GOAL_SHARE = 1.5  # no node serving more than this times another's share (conversations)
GOAL_SKEW = 1.5  # skewed: no node above this times the mean load
GOAL_FRESH = 0.05  # fresh prompts: cache-aware at most 5 % slower than power-of-two
KEPT_TTFT = 1.25  # two replicas keep the gains: later-turn TTFT p50 at most this times one replica's...
KEPT_RATE = 0.9  # ...and requests/s at least this times one replica's

_VOCABULARY = (
    "account billing invoice refund policy shipping order warranty device battery screen network "
    "router password login profile subscription plan upgrade discount coupon delivery courier address "
    "region support ticket escalation manager weekday weekend holiday schedule hours priority customer "
    "partner "
)
_WORDS = _VOCABULARY.split()
_QUESTIONS = (
    "How do I reset my password?",
    "When will my order arrive?",
    "Can I get a refund?",
    "What plans do you offer?",
    "Is weekend support available?",
    "How do I change my address?",
    "Why was I billed twice?",
    "Can I upgrade my plan?",
)


def system_prompt(seed: int) -> str:
    """A long, distinct system prompt: the part of each request that repeats."""
    rng = random.Random(seed)
    sentences = [
        f"Rule {i + 1}: when the customer asks about {rng.choice(_WORDS)} or {rng.choice(_WORDS)}, "
        f"mention the {rng.choice(_WORDS)} {rng.choice(_WORDS)} and keep the {rng.choice(_WORDS)} short."
        for i in range(SYSTEM_SENTENCES)
    ]
    return f"You are assistant number {seed} of the support desk. " + " ".join(sentences)


@dataclass(slots=True)
class Answer:
    turn: int  # 0 for a first turn (or a single request)
    ttft_s: float
    node: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    error: str = ""


@dataclass(slots=True)
class Run:
    name: str
    answers: list[Answer] = field(default_factory=list)
    wall_s: float = 0.0
    nodes: list[str] = field(default_factory=list)  # the fleet's node ids, for the shares

    def ok(self) -> list[Answer]:
        return [a for a in self.answers if not a.error]

    def ttft(self, later: bool | None, q: float) -> float:
        values = sorted(a.ttft_s for a in self.ok() if later is None or (a.turn > 0) == later)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    @property
    def rate(self) -> float:
        return len(self.ok()) / self.wall_s if self.wall_s else 0.0

    def shares(self, nodes: Sequence[str]) -> list[int]:
        served = Counter(a.node for a in self.ok())
        return [served.get(n, 0) for n in nodes]

    @property
    def cached_share(self) -> float:
        prompt = sum(a.prompt_tokens for a in self.ok())
        return sum(a.cached_tokens for a in self.ok()) / prompt if prompt else 0.0


async def _chat(client: httpx.AsyncClient, messages: list[dict[str, str]], turn: int) -> Answer:
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.monotonic()
    answer = Answer(turn, 0.0, "")
    pieces: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        answer.node = reply.headers.get("x-llmlb-node", "")
        if reply.status_code != 200:
            answer.error = f"{reply.status_code} {(await reply.aread())[:200]!r}"
            return answer
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    if not answer.ttft_s:
                        answer.ttft_s = time.monotonic() - started
                    pieces.append(choice["delta"]["content"])
            usage = chunk.get("usage")
            if usage:
                answer.prompt_tokens = usage["prompt_tokens"]
                answer.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    answer.ttft_s = answer.ttft_s or time.monotonic() - started
    answer.text = "".join(pieces)
    return answer


async def _in_turn(jobs: Sequence[J], at_once: int, work: Callable[[J], Awaitable[None]]) -> None:
    """Runs ``work(job)`` for every job, ``at_once`` at a time, in order of the list."""
    queue: asyncio.Queue[J] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            await work(queue.get_nowait())

    await asyncio.gather(*(worker() for _ in range(at_once)))


async def conversations(
    clients: Sequence[httpx.AsyncClient],
    name: str,
    seed: int,
    at_once: int = AT_ONCE,
    think_s: tuple[float, float] = (0.0, 0.0),
) -> Run:
    """12 conversations of 4 turns, ``at_once`` at a time, a pause drawn from ``think_s`` before each
    later turn (the user reading and typing); with several balancers, each turn goes to the next."""
    run = Run(name)

    async def converse(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        messages = [{"role": "system", "content": system_prompt(seed * 100 + index)}]
        for turn in range(TURNS):
            if turn:
                await asyncio.sleep(rng.uniform(*think_s))
            messages.append({"role": "user", "content": rng.choice(_QUESTIONS)})
            answer = await _chat(clients[(index + turn) % len(clients)], messages, turn)
            run.answers.append(answer)
            messages.append({"role": "assistant", "content": answer.text})

    began = time.monotonic()
    await _in_turn(list(range(CONVERSATIONS)), at_once, converse)
    run.wall_s = time.monotonic() - began
    return run


async def chatting(clients: Sequence[httpx.AsyncClient], name: str, seed: int) -> Run:
    """Conversations as people hold them: more at once than there are nodes, pauses between turns."""
    return await conversations(clients, name, seed, CHAT_AT_ONCE, CHAT_THINK_S)


async def skewed(client: httpx.AsyncClient, name: str, seed: int) -> Run:
    """Many clients, one hot system prompt: single requests with fresh questions."""
    run = Run(name)
    rng = random.Random(seed)
    hot = system_prompt(seed * 100)
    cold = [system_prompt(seed * 100 + 1 + i) for i in range(8)]
    jobs = [
        (hot if rng.random() < SKEW_HOT else rng.choice(cold), f"{rng.choice(_QUESTIONS)} (case {i})")
        for i in range(SKEW_REQUESTS)
    ]

    async def ask(job: tuple[str, str]) -> None:
        system, question = job
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        run.answers.append(await _chat(client, messages, 0))

    began = time.monotonic()
    await _in_turn(jobs, SKEW_CLIENTS, ask)
    run.wall_s = time.monotonic() - began
    return run


async def fresh(client: httpx.AsyncClient, name: str, seed: int) -> Run:
    """Nothing shared: every prompt is new."""
    run = Run(name)

    async def ask(index: int) -> None:
        text = system_prompt(seed * 1000 + index)[:1200]  # ~300 tokens, unlike any other
        run.answers.append(await _chat(client, [{"role": "user", "content": text}], 0))

    began = time.monotonic()
    await _in_turn(list(range(FRESH_REQUESTS)), AT_ONCE, ask)
    run.wall_s = time.monotonic() - began
    return run


# -- the fleet ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Fleet:
    balancers: list[ReplicaProcess]
    nodes: list[NodeProcess]
    key: str
    admin: str

    @property
    def node_ids(self) -> list[str]:
        return [n.node_id for n in self.nodes]

    @contextlib.asynccontextmanager
    async def clients(self) -> AsyncIterator[list[httpx.AsyncClient]]:
        async with contextlib.AsyncExitStack() as stack:
            yield [
                await stack.enter_async_context(
                    httpx.AsyncClient(
                        base_url=b.http_url,
                        timeout=REQUEST_TIMEOUT_S,
                        headers={"Authorization": f"Bearer {self.key}"},
                    )
                )
                for b in self.balancers
            ]


async def _online(fleet: Fleet, registry: rgrpc.RegistryAsyncStub) -> bool:
    reply = await registry.ListNodes(
        rpb.ListNodesRequest(), timeout=10, metadata=bearer_metadata(fleet.admin)
    )
    online = {n.id for n in reply.nodes if n.state == pb.NODE_STATE_ONLINE}
    return "" not in fleet.node_ids and set(fleet.node_ids) <= online


async def _warm(fleet: Fleet) -> None:
    """Until both nodes have loaded gemma and answered (a tiny prompt: nothing worth caching).

    Both are told to load it first: the router prefers a node with the model loaded over one with it
    only on disk, so a node that loaded first would otherwise take every request.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    async with grpc.aio.insecure_channel(fleet.balancers[0].address, options=CHANNEL_OPTIONS) as channel:
        registry = rgrpc.RegistryStub(channel)
        while not await _online(fleet, registry):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes not online within {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.5)
        await registry.PullModel(
            rpb.PullModelRequest(model_id=MODEL), timeout=10, metadata=bearer_metadata(fleet.admin)
        )
    seen: set[str] = set()
    async with fleet.clients() as clients:
        while seen != set(fleet.node_ids) or "" in seen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes not answering within {START_TIMEOUT_S:.0f} s (seen {seen})")
            batch = [_chat(clients[0], [{"role": "user", "content": "Hi"}], 0) for _ in range(4)]
            seen |= {a.node for a in await asyncio.gather(*batch) if not a.error}
            if not seen:
                await asyncio.sleep(1)


@contextlib.asynccontextmanager
async def _fleet(
    root: Path, hub: FakeHub, database_url: str | Sequence[str], routing: str, cache_mb: int | None = None
) -> AsyncIterator[Fleet]:
    env = {"HF_ENDPOINT": hub.url, "LLMLB_ROUTING": routing}
    urls = [database_url] if isinstance(database_url, str) else list(database_url)
    balancers = [ReplicaProcess(f"b{i}", root / f"b{i}", url, env) for i, url in enumerate(urls)]
    nodes: list[NodeProcess] = []
    try:
        for b in balancers:
            b.start()
            await b.wait_ready()
        admin = (root / "b0" / "admin-key").read_text().strip()
        node_key = await create_key(balancers[0], admin, "bench-nodes", pb.SCOPE_NODE)
        key = await create_key(balancers[0], admin, "bench-clients", pb.SCOPE_API)
        addresses = ",".join(b.address for b in balancers)
        # Two nodes share this machine: one engine thread each, or their threads fight over the cores.
        node_env = {"XLLM_ENGINE_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
        if cache_mb is not None:
            node_env["XLLM_PREFIX_CACHE_MB"] = str(cache_mb)
        nodes = [
            NodeProcess.start(root / f"node{i}", addresses, node_key, hub.url, node_env) for i in range(2)
        ]
        fleet = Fleet(balancers, nodes, key, admin)
        await _warm(fleet)
        yield fleet
    finally:
        for node in nodes:
            node.stop()
        for b in balancers:
            b.stop()


async def _policy_runs(root: Path, hub: FakeHub, routing: str, cache_mb: int | None = None) -> list[Run]:
    url = f"sqlite+aiosqlite:///{root / 'llmlb.db'}"
    async with _fleet(root, hub, url, routing, cache_mb) as fleet, fleet.clients() as clients:
        runs = [
            await conversations(clients, "conversations", seed=1),
            await chatting(clients, "chatting", seed=4),
        ]
        if cache_mb is None:
            runs.append(await skewed(clients[0], "skewed", seed=2))
            runs.append(await fresh(clients[0], "fresh", seed=3))
        for run in runs:
            run.name = f"{run.name}/{routing}" + ("" if cache_mb is None else " (cache off)")
            run.answers.sort(key=lambda a: a.turn)
            run.nodes = fleet.node_ids
            print(_row(run), flush=True)  # progress, and what a later failure would not take away
    return runs


async def _replica_run(root: Path, hub: FakeHub) -> Run:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL's binaries are not installed (make install puts them in place)")
    server = PostgresServer(bin_dir)
    await asyncio.to_thread(server.start)
    try:
        url = server.url(server.create_database())
        async with _fleet(root, hub, [url, url], "cache-aware") as fleet, fleet.clients() as clients:
            run = await chatting(clients, "chatting/cache-aware, two replicas", seed=4)
            run.nodes = fleet.node_ids
            print(_row(run), flush=True)
            return run
    finally:
        await asyncio.to_thread(server.stop)


def _seconds(run: Run, later: bool) -> str:
    if not any((a.turn > 0) == later for a in run.ok()):
        return "-"  # single requests have no later turns
    return f"{run.ttft(later, 0.5):.2f} / {run.ttft(later, 0.9):.2f}"


def _row(run: Run) -> str:
    shares = run.shares(run.nodes)
    errors = len(run.answers) - len(run.ok())
    return (
        f"| {run.name} | {_seconds(run, False)} | {_seconds(run, True)} | {run.rate:.2f} | "
        f"{' : '.join(str(s) for s in shares)} | {run.cached_share:.0%} | {errors} |"
    )


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


async def run() -> str:
    await asyncio.to_thread(packaged_models.lay_out, catalogue_model(MODEL), CACHE)
    results: dict[str, Run] = {}
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        root = Path(tmp)
        with FakeHub() as hub:
            # A throw-away fleet first: the first one started pays for cold disk and caches, which
            # would otherwise count against whichever policy is measured first.
            async with _fleet(
                root / "warm-up", hub, f"sqlite+aiosqlite:///{root / 'warm.db'}", "round-robin"
            ):
                pass
            for routing in ("cache-aware", "power-of-two", "round-robin"):
                for r in await _policy_runs(root / routing, hub, routing):
                    results[r.name] = r
            for r in await _policy_runs(root / "today", hub, "power-of-two", cache_mb=0):
                results[r.name] = r
            replicas = await _replica_run(root / "replicas", hub)
            results[replicas.name] = replicas
    return _report(results)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _goals(results: dict[str, Run], workload: str) -> list[str]:
    """The conversation goals for ``workload``: later-turn TTFT, requests/s, shares."""
    ca, p2 = results[f"{workload}/cache-aware"], results[f"{workload}/power-of-two"]
    off = results[f"{workload}/power-of-two (cache off)"]
    later = _ratio(p2.ttft(True, 0.5), ca.ttft(True, 0.5))
    rate = _ratio(ca.rate, p2.rate)
    shares = ca.shares(ca.nodes)
    share = _ratio(max(shares), min(shares)) if shares else float("inf")
    return [
        f"- {workload}: later-turn TTFT p50, power-of-two / cache-aware {later:.1f}x (goal {GOAL_TTFT:g}x: "
        f"{_verdict(later >= GOAL_TTFT)}); power-of-two with the node cache off / cache-aware "
        f"{_ratio(off.ttft(True, 0.5), ca.ttft(True, 0.5)):.1f}x.",
        f"- {workload}: requests/s, cache-aware / power-of-two {rate:.2f}x (goal {GOAL_RATE:g}x: "
        f"{_verdict(rate >= GOAL_RATE)}); / power-of-two with the node cache off "
        f"{_ratio(ca.rate, off.rate):.2f}x.",
        f"- {workload}: node shares under cache-aware, busiest / least busy {share:.2f} (goal at most "
        f"{GOAL_SHARE:g}: {_verdict(share <= GOAL_SHARE)}).",
    ]


def _report(results: dict[str, Run]) -> str:
    ca = results["chatting/cache-aware"]
    two = results["chatting/cache-aware, two replicas"]
    skew_ca, skew_p2 = results["skewed/cache-aware"], results["skewed/power-of-two"]
    fresh_ca, fresh_p2 = results["fresh/cache-aware"], results["fresh/power-of-two"]
    skew_shares = skew_ca.shares(skew_ca.nodes)
    skew_load = _ratio(max(skew_shares), statistics.mean(skew_shares)) if skew_shares else float("inf")
    skew_p90 = skew_ca.ttft(None, 0.9), skew_p2.ttft(None, 0.9)
    fresh_gap = 1 - _ratio(fresh_ca.rate, fresh_p2.rate)  # > 0: cache-aware slower
    two_ttft = _ratio(two.ttft(True, 0.5), ca.ttft(True, 0.5))
    two_rate = _ratio(two.rate, ca.rate)
    kept = two_ttft <= KEPT_TTFT and two_rate >= KEPT_RATE
    lines = [
        "## Prefix-cache-aware routing: multi-turn chats, two gemma-3-270m nodes",
        "",
        f"Conversations: 12 conversations x {TURNS} turns, each with its own ~600-token system prompt, "
        f"{AT_ONCE} at a time, back to back (the shape measured in the issue). Chatting: the same with "
        f"{CHAT_AT_ONCE} at a time and a {CHAT_THINK_S[0]:g}-{CHAT_THINK_S[1]:g} s pause before each "
        f"later turn, as people chat. {MAX_TOKENS} greedy tokens per answer, streamed through the HTTP "
        f"door; fresh nodes for each policy. Skewed: {SKEW_CLIENTS} clients, {SKEW_REQUESTS} single "
        f"requests, {SKEW_HOT:.0%} on one hot system prompt. Fresh: {FRESH_REQUESTS} prompts sharing "
        'nothing. "cache off": nodes with `XLLM_PREFIX_CACHE_MB=0`, where each context reuses only its '
        "own last prompt, as nodes did before prefix caching. TTFT in seconds; share = requests per "
        "node; cached = prompt tokens taken from a node's prefix cache.",
        "",
        "| run | TTFT first turns p50 / p90 | TTFT later turns p50 / p90 | requests/s | share | cached "
        "| errors |",
        "|---|---|---|---|---|---|---|",
        *(_row(r) for r in results.values()),
        "",
        *_goals(results, "conversations"),
        *_goals(results, "chatting"),
        f"- Skewed: busiest node / mean {skew_load:.2f} (goal at most {GOAL_SKEW:g}: "
        f"{_verdict(skew_load <= GOAL_SKEW)}); TTFT p90 cache-aware {skew_p90[0]:.2f} s vs power-of-two "
        f"{skew_p90[1]:.2f} s (goal no worse: {_verdict(skew_p90[0] <= skew_p90[1])}).",
        f"- Fresh prompts: requests/s cache-aware {fresh_ca.rate:.2f} vs power-of-two {fresh_p2.rate:.2f} "
        f"(goal: cache-aware at most {GOAL_FRESH:.0%} slower: {_verdict(fresh_gap <= GOAL_FRESH)}; both "
        "choose by load alone when nothing is shared, so a gap either way is this run's noise).",
        f"- Chatting through two replicas (each turn to the other one) against one: later-turn TTFT p50 "
        f"{two.ttft(True, 0.5):.2f} s vs {ca.ttft(True, 0.5):.2f} s, requests/s {two.rate:.2f} vs "
        f"{ca.rate:.2f} (gains kept, TTFT at most {KEPT_TTFT:g}x and requests/s at least {KEPT_RATE:g}x "
        f"one replica's: {_verdict(kept)}).",
        "",
    ]
    return "\n".join(lines)
