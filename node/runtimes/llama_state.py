"""A llama.cpp context's sequence state, cut and copied at block boundaries.

Only sequence 0's KV cells are copied (``llama_state_seq_*``), never ``Llama.save_state()``, which also
copies ``scores``: n_batch x n_vocab floats, 512 MB for a 262k vocabulary. After a restore the
context's ``input_ids``/``n_tokens`` say which tokens it holds, so ``Llama.generate`` evaluates only
the rest of a prompt. Why cuts fall on ``BLOCK`` boundaries: see ``node.runtimes.llama``.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from llama_cpp import Llama

log = structlog.get_logger(__name__)

BLOCK = 64  # micro-batch size of generation contexts; prefixes are reused in whole blocks only


def aligned(n: int) -> int:
    """``n`` rounded down to a whole number of blocks."""
    return n - n % BLOCK


def _llama_cpp() -> Any:
    import llama_cpp

    return llama_cpp


def llama_state_size(ctx: Any) -> int:
    """Bytes of sequence 0's state (its KV cells): what saving it takes, without logits or scores."""
    return int(_llama_cpp().llama_state_seq_get_size(ctx, 0))


def clear(llm: Llama) -> None:
    lc = _llama_cpp()
    lc.llama_memory_clear(lc.llama_get_memory(llm._ctx.ctx), True)
    llm.reset()  # type: ignore[no-untyped-call]


def keep(llm: Llama, n: int) -> int:
    """Cuts the context back to its first ``n`` tokens (0: clears it); returns how many it holds."""
    if n <= 0 or not llm._ctx.kv_cache_seq_rm(-1, n, -1):
        clear(llm)
        return 0
    llm.n_tokens = n
    llm._requires_eval = True  # the logits are not those of token n: generate evaluates at least one
    return n


def restore(llm: Llama, tokens: tuple[int, ...], state: bytes) -> bool:
    """Puts a saved prefix state into the context; False (context cleared) if llama.cpp refuses it."""
    clear(llm)
    buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    if not _llama_cpp().llama_state_seq_set_data(llm._ctx.ctx, buffer, len(state), 0):
        clear(llm)
        log.warning("prefix_restore_failed", tokens=len(tokens), bytes=len(state))
        return False
    llm.input_ids[: len(tokens)] = tokens
    llm.n_tokens = len(tokens)
    llm._requires_eval = True
    return True


def snapshot(llm: Llama, limit: int) -> bytes | None:
    """The context's sequence state as bytes; None when it is over ``limit`` bytes or cannot be read."""
    ctx = llm._ctx.ctx
    size = llama_state_size(ctx)
    if not size or size > limit:
        return None
    buffer = (ctypes.c_uint8 * size)()
    written = int(_llama_cpp().llama_state_seq_get_data(ctx, buffer, size, 0))
    return bytes(memoryview(buffer)[:written]) if written else None
