"""Sampling under a grammar without checking the whole vocabulary at every token.

llama-cpp-python runs llama.cpp's grammar sampler over every token of the vocabulary (262,144 for
gemma 3) before top-k, which halves the speed of a small model. The likeliest tokens are almost always
allowed, so, as llama.cpp's own server does, this filter asks the grammar about the best few
candidates only and falls back to the whole vocabulary when none of them is allowed. What it lets
through is exactly what the full check would allow among those candidates, so greedy answers are the
ones the full check would give.

It is a ``logits_processor``: it sees the scores before any other sampler, and learns which token was
chosen from the context's tokens at its next call (accepting it into the grammar's state).
"""

from __future__ import annotations

import ctypes
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from llama_cpp import Llama

CANDIDATES = 64  # checked one by one; top-k (40) never looks further


class GrammarFilter:
    """Masks the scores of tokens the grammar does not allow next."""

    def __init__(self, llm: Llama, grammar: str, *, greedy: bool) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._sampler = llama_cpp.llama_sampler_init_grammar(
            llm._model.vocab, grammar.encode("utf-8"), b"root"
        )
        if not self._sampler:
            raise ValueError("llama.cpp could not parse the grammar")
        self._greedy = greedy
        self._one = (llama_cpp.llama_token_data * 1)()
        self._array = llama_cpp.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self._seen = -1  # how many of the context's tokens the grammar has accounted for

    def close(self) -> None:
        if self._sampler:
            self._lib.llama_sampler_free(self._sampler)
            self._sampler = None

    def __del__(self) -> None:
        self.close()

    def _allowed(self, token: int) -> bool:
        self._one[0].id = token  # type: ignore[assignment]
        self._one[0].logit = 0.0
        self._one[0].p = 0.0
        self._array.size = 1
        self._array.selected = -1
        self._lib.llama_sampler_apply(self._sampler, ctypes.byref(self._array))
        return not math.isinf(self._one[0].logit)

    def _all_allowed(self, scores: npt.NDArray[np.single]) -> npt.NDArray[np.bool_]:
        n = len(scores)
        data = (self._lib.llama_token_data * n)()
        view = np.ctypeslib.as_array(data)
        view["id"] = np.arange(n, dtype=np.int32)
        view["logit"] = 0.0
        array = self._lib.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
        self._lib.llama_sampler_apply(self._sampler, ctypes.byref(array))
        return np.asarray(~np.isinf(view["logit"]))

    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> Any:
        if self._seen < 0:
            self._seen = len(input_ids)  # the prompt: nothing sampled yet
        for token in input_ids[self._seen :]:
            self._lib.llama_sampler_accept(self._sampler, int(token))
        self._seen = len(input_ids)
        best = np.argpartition(scores, -CANDIDATES)[-CANDIDATES:]
        best = best[np.argsort(-scores[best])]
        allowed = []
        for token in best:
            if self._allowed(int(token)):
                allowed.append(int(token))
                if self._greedy:
                    break
        masked = np.full_like(scores, -np.inf)
        if allowed:
            masked[allowed] = scores[allowed]
        else:  # none of the likeliest: ask about every token
            keep = self._all_allowed(scores)
            masked[keep] = scores[keep]
        return masked
