"""Log-probabilities of generated tokens, from the logits llama.cpp computed for them.

The numbers are the model's raw distribution (a log-softmax of its logits, before temperature, top-p or
any grammar), as OpenAI reports them. They are computed only when a request asks for them: reading the
whole vocabulary's logits for every token costs about a millisecond per token on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from common.inference import TokenLogprob, TopLogprob

if TYPE_CHECKING:
    from llama_cpp import Llama

Floats = npt.NDArray[np.floating]


# Alternatives are looked for first among the logits this close to the maximum (e^-10 of its weight):
# ranking a few candidates is much cheaper than partitioning a whole vocabulary; when fewer than asked are
# that close, the whole vocabulary is ranked.
NEAR_TOP = 10.0


def log_normalizer(logits: Floats) -> float:
    """``log(sum(exp(logits)))``, shifted by the maximum so it never overflows: logprob = logit - this."""
    values = np.asarray(logits)  # llama.cpp's float32 as is: the vocabulary-sized step stays fast
    top = values.max()
    weights = np.exp(values - top)
    return float(top) + math.log(float(np.sum(weights, dtype=np.float64)))


def log_softmax(logits: Floats) -> npt.NDArray[np.float64]:
    """``log(softmax(logits))`` for a whole vector (the runtime needs only a few entries of it)."""
    values = np.asarray(logits, dtype=np.float64)
    result: npt.NDArray[np.float64] = values - log_normalizer(values)
    return result


def top_indices(scores: Floats, k: int) -> list[int]:
    """The ``k`` highest-scoring token ids, best first; equal scores in id order."""
    if k <= 0:
        return []
    k = min(k, scores.shape[0])
    candidates = np.flatnonzero(scores >= float(np.max(scores)) - NEAR_TOP)
    if candidates.shape[0] < k:
        candidates = np.arange(scores.shape[0])
    values = scores[candidates]
    part = np.argpartition(-values, k - 1)[:k]  # the k largest, unordered
    order = np.lexsort((candidates[part], -values[part]))
    return [int(i) for i in candidates[part][order]]


# OpenAI's floor for a log-probability: JSON has no -Infinity, and a masked logit (-inf) would give one.
FLOOR = -9999.0


def _finite(value: float) -> float:
    return value if value > FLOOR else FLOOR


def token_text(data: bytes) -> str:
    """A token's text; a token holding part of a multi-byte character shows its bytes as ``\\xNN``."""
    return data.decode("utf-8", errors="backslashreplace")


def token_logprob(logits: Floats, token: int, top: int, token_bytes: Callable[[int], bytes]) -> TokenLogprob:
    """The entry for ``token`` sampled from ``logits``, with the ``top`` likeliest alternatives.

    Softmax keeps the logits' order, so the alternatives are ranked by logit and only the entries
    returned are normalized: no second vocabulary-sized array per token.
    """
    norm = log_normalizer(logits)
    alternatives = []
    for i in top_indices(logits, top):
        data = token_bytes(i)
        alternatives.append(
            TopLogprob(token=token_text(data), logprob=_finite(float(logits[i]) - norm), bytes=data)
        )
    data = token_bytes(token)
    return TokenLogprob(
        token=token_text(data),
        logprob=_finite(float(logits[token]) - norm),
        bytes=data,
        top_logprobs=tuple(alternatives),
    )


class LogprobReader:
    """Reads, right after a token is sampled, the logits it was sampled from, in one ``Llama`` context."""

    def __init__(self, llm: Llama, top: int) -> None:
        self._llm = llm
        self._top = top
        self._vocab = llm.n_vocab()

    def _bytes(self, token: int) -> bytes:
        return self._llm.detokenize([token], special=True)

    def read(self, token: int) -> TokenLogprob:
        """``token``'s entry; valid only before the context evaluates anything else."""
        import llama_cpp

        # -1: the last position whose logits the context computed, which is what the sampler read.
        pointer = llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(self._vocab,))
        return token_logprob(logits, token, self._top, self._bytes)
