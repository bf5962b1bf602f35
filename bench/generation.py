"""One greedy generation of PROMPT, timed: through an ``Inference`` door, or llama-cpp-python directly.

The direct call is the baseline the node's generation is measured against. Each one runs on a thread
of its own that ends with it, as the node's own engine calls do, so that exactly one OpenMP team
exists while the baseline generates: the same as in a program of its own that calls llama-cpp-python
from its main thread. Calls from a long-lived pool would leave a team behind
on every thread used, and with more team threads than cores every team generates slower (see
node/threads.py), so the baseline would measure the benchmark's own threads.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from devkit.packaged_models import GEMMA
from node.threads import FreshThreadExecutor

PROMPT = "Here is a long story about a lighthouse keeper and the sea. Once upon a time,"
CONTEXT_TOKENS = 4096  # the node's default context window
T = TypeVar("T")

_THREADS = FreshThreadExecutor(1, "bench-direct")


async def on_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """Runs ``fn(*args)`` on a fresh thread, keeping the event loop free (heartbeats, sessions)."""
    return await asyncio.get_running_loop().run_in_executor(_THREADS, fn, *args)


def engine_threads() -> int:
    """The node's engine setting: one thread per core."""
    return os.cpu_count() or 1


async def open_llama(path: Path) -> Any:
    """A ``Llama`` with the node's engine settings (threads, context)."""
    from llama_cpp import Llama

    threads = engine_threads()
    return await on_own_thread(
        lambda: Llama(
            model_path=str(path),
            n_ctx=CONTEXT_TOKENS,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    )


def _tokens(llm: Any, n: int) -> int:
    result = llm.create_completion(PROMPT, max_tokens=n, temperature=0.0, seed=1)
    return int(result["usage"]["completion_tokens"])


def timed_generation(llm: Any, n: int) -> float:
    """Seconds for one streamed greedy generation of up to ``n`` tokens, on the calling thread."""
    started = time.perf_counter()
    for _ in llm.create_completion(PROMPT, max_tokens=n, temperature=0.0, stream=True, seed=1):
        pass
    return time.perf_counter() - started


async def direct_tokens(llm: Any, n: int) -> int:
    """How many tokens greedy decoding of PROMPT yields (stream chunks need not be one token each)."""
    return await on_own_thread(_tokens, llm, n)


async def direct_round(llm: Any, n: int) -> float:
    """:func:`timed_generation` on a thread of its own."""
    return await on_own_thread(timed_generation, llm, n)


async def grpc_round(stub: igrpc.InferenceAsyncStub, n: int) -> tuple[int, float]:
    """Tokens and seconds for the same generation through an ``Inference`` door (node or balancer)."""
    request = ipb.CompleteRequest(
        model=GEMMA, prompt=PROMPT, params=ipb.SamplingParams(max_tokens=n, temperature=0.0, seed=1)
    )
    started = time.perf_counter()
    produced = 0
    async for chunk in stub.Complete(request, timeout=300):
        if chunk.finish_reason:
            produced = chunk.usage.completion_tokens
    return produced, time.perf_counter() - started
