"""Sampling under a grammar without checking the whole vocabulary at every token.

llama-cpp-python runs llama.cpp's grammar sampler over every token of the vocabulary (262,144 for
gemma 3) before top-k, which halves the speed of a small model. The likeliest tokens are almost always
allowed, so this filter asks the grammar about the best few candidates, then a few thousand, and
only then the whole vocabulary, stopping at the first stage with an allowed token. What it lets
through is exactly what the full check would allow among those candidates, so greedy answers are the
ones the full check would give.

It is a ``logits_processor``: it sees the scores before any other sampler, and learns which token was
chosen from the context's tokens at its next call (accepting it into the grammar's state).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from llama_cpp import Llama

# The likeliest tokens are asked about first, in one call per stage; top-k (40) never looks further
# than the first stage. Structural tokens the grammar forces (a key's quotes) are often unlikely to a
# small model, hence the middle stage before the whole vocabulary.
STAGES = (64, 4096)


class GrammarFilter:
    """Masks the scores of tokens the grammar does not allow next."""

    def __init__(self, llm: Llama, grammar: str) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._sampler = llama_cpp.llama_sampler_init_grammar(
            llm._model.vocab, grammar.encode("utf-8"), b"root"
        )
        if not self._sampler:
            raise ValueError("llama.cpp could not parse the grammar")
        self._data = (llama_cpp.llama_token_data * STAGES[-1])()
        self._view = np.ctypeslib.as_array(self._data)
        self._seen = -1  # how many of the context's tokens the grammar has accounted for

    def close(self) -> None:
        if self._sampler:
            self._lib.llama_sampler_free(self._sampler)
            self._sampler = None

    def __del__(self) -> None:
        self.close()

    def _allowed(self, tokens: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
        """Those of ``tokens`` the grammar allows next, in the same order."""
        if len(tokens) > len(self._view):
            return tokens[self._allowed_mask(len(tokens), tokens)]
        n = len(tokens)
        self._view["id"][:n] = tokens
        self._view["logit"][:n] = 0.0
        array = self._lib.llama_token_data_array(data=self._data, size=n, selected=-1, sorted=False)
        self._lib.llama_sampler_apply(self._sampler, ctypes.byref(array))
        return np.asarray(tokens[~np.isinf(self._view["logit"][:n])])

    def _allowed_mask(self, n: int, tokens: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
        data = (self._lib.llama_token_data * n)()
        view = np.ctypeslib.as_array(data)
        view["id"] = tokens
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
        allowed: npt.NDArray[np.intp] = np.empty(0, dtype=np.intp)
        for size in (*STAGES, len(scores)):
            if size >= len(scores):
                allowed = self._allowed(np.arange(len(scores), dtype=np.intp))
                break
            best = np.argpartition(scores, -size)[-size:]
            allowed = self._allowed(best)
            if len(allowed):
                break
        masked = np.full_like(scores, -np.inf)
        # Every token outside a stage scores below every token in it, so the best allowed is among these.
        masked[allowed] = scores[allowed]
        return masked
