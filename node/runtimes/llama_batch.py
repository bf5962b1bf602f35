"""Continuous batching for one llama.cpp model: one context, many sequences, one scheduler thread.

The context holds ``sequences`` sequences, each with a KV cache of its own (``kv_unified`` off) of
``context_tokens`` cells: the weights are loaded once, the KV cache is the slots' total. At each step
the scheduler evaluates prompt chunks of newly arrived requests (at most ``PREFILL_PER_STEP`` tokens,
shortest prompts first, so a long prompt neither stalls the other streams nor a short request's first
token), then decodes one batch holding the next token of every generating choice. Requests join and
leave between steps. Sampling happens here, right after the decode, with each choice's own llama.cpp
sampler chain (the same as ``Llama.generate`` builds) reading its row of the logits. A greedy choice
(temperature 0, no penalties, no grammar) has no chain: its token is the row's first largest logit,
which is what that chain's greedy sampler picks, read in 0.1 ms instead of the chain's 0.6-1 ms (it
fills a candidate array the size of the vocabulary, 262,144 entries for gemma 3, for every token).

Exactness: a prompt chunk is always evaluated alone, in whole aligned blocks, in a sequence whose cells
are its own, exactly as a context of its own would (a unified cache would interleave other sequences'
cells and change the sums). Generated tokens of several sequences decoded in one batch do change
llama.cpp's numbers a little (measured on the CPU: greedy answers of one prompt in four diverge after a
few tokens); ``exact`` decodes each of them on its own, so answers equal those of a request alone.

The ``n`` choices of one request share its prompt: evaluated once, it is copied
(``llama_memory_seq_cp``) into an idle sequence per further choice, and those choices sample from the
prompt's own logits. When no sequence is idle the choices run in turn in the request's sequence,
evaluating only the prompt's last partial block again.

Over 400 lines on purpose: admission (KV room, the prefix cache, kept prompts), the step and the
samplers act on the same sequences and the same context, under the one scheduler thread.
"""

from __future__ import annotations

import ctypes
import queue
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import structlog

from common.errors import ErrorCode, LlmlbError
from common.inference import SamplingParams, TokenLogprob
from node.runtimes.grammar_sampler import GrammarFilter
from node.runtimes.llama_state import BLOCK, aligned
from node.runtimes.logprobs import token_logprob
from node.runtimes.prefix_cache import PrefixCache, common_length

if TYPE_CHECKING:
    from llama_cpp import Llama

log = structlog.get_logger(__name__)

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95


def sampler_settings(params: SamplingParams) -> dict[str, Any]:
    """llama.cpp's sampler chain settings for ``params`` (``Llama.generate`` / ``_init_sampler``), one
    rule for both engines so a request samples alike batched or not."""
    temperature = DEFAULT_TEMPERATURE if params.temperature is None else params.temperature
    return {
        "temp": temperature,
        "top_p": DEFAULT_TOP_P if params.top_p is None else params.top_p,
        "top_k": 40 if temperature > 0 else 1,
        "min_p": 0.05 if params.top_p is None else 0.0,
        "repeat_penalty": 1.0,
        "presence_penalty": params.presence_penalty or 0.0,
        "frequency_penalty": params.frequency_penalty or 0.0,
    }


PREFILL_PER_STEP = 2 * BLOCK  # prompt tokens evaluated per step, all requests together: bounds a step
BATCH_TOKENS = 512  # the context's n_batch: prompt chunks plus one token per generating choice


@dataclass(eq=False)
class Choice:
    """One generated answer of a request, in a sequence of its own."""

    index: int
    seq: int
    sampler: Any  # llama_cpp._internals.LlamaSampler; None: greedy, the row's argmax
    grammar: GrammarFilter | None
    ids: npt.NDArray[np.intc]  # prompt + generated tokens, for the grammar filter
    n_ids: int
    budget: int
    produced: int = 0
    pending: int = -1  # the token sampled and not yet evaluated
    done: bool = False


@dataclass(eq=False)
class Job:
    """One request's prompt and choices; its tokens come out on ``out`` as ``(index, token, logprob)``.

    ``(index, None, None)`` ends a choice; ``(-1, None, error)`` ends the job with an error.
    """

    prompt: list[int]
    params: SamplingParams
    grammar: str | None
    cancel: threading.Event  # the caller went away
    budget: int
    stop: threading.Event = field(default_factory=threading.Event)  # the reader is done with it
    out: queue.Queue[tuple[int, int | None, Any]] = field(default_factory=queue.Queue)
    seq: int = -1  # the sequence holding the prompt
    cached: int = 0  # prompt tokens found computed
    evaluated: int = 0  # prompt tokens held in ``seq``
    started: int = 0  # choices begun
    choices: list[Choice] = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)
    halted: set[int] = field(default_factory=set)  # choices the reader ended (a stop sequence)
    save_hashes: list[int] | None = None  # set by the reader when it is done: save the prompt under them


class BatchScheduler:
    """The decoding loop of one loaded model. Public methods are thread-safe."""

    def __init__(
        self,
        llm: Llama,
        *,
        sequences: int,
        context_tokens: int,
        threads: int,
        cache: PrefixCache | None,
        exact: bool,
    ) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llm
        self.n_seq = max(1, min(sequences, int(llama_cpp.llama_max_parallel_sequences())))
        self.per_seq = context_tokens
        self.exact = exact
        self._cache = cache
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_seq * context_tokens
        params.n_batch = BATCH_TOKENS
        params.n_ubatch = BLOCK  # aligned micro-batches: see node.runtimes.llama
        params.n_seq_max = self.n_seq
        params.kv_unified = False
        params.swa_full = True
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if threads:
            params.n_threads = params.n_threads_batch = threads
        else:
            params.n_threads, params.n_threads_batch = llm.n_threads, llm.n_threads_batch
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise LlmlbError(ErrorCode.INTERNAL, "llama.cpp could not create a batched context")
        self._mem = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._vocab = llm._model.vocab
        self._n_vocab = llm.n_vocab()
        # Idle sequences, least recently used first, each with the aligned prompt it still holds.
        self._idle: dict[int, list[int]] = {seq: [] for seq in range(self.n_seq)}
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._wake = threading.Condition()
        self._closed = False
        self.prompt_tokens = 0  # prompt tokens evaluated so far (reused prefixes are not)
        self._thread = threading.Thread(target=self._loop, name="llama-batch", daemon=True)
        self._thread.start()

    # -- the caller's side -----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closed:
                raise LlmlbError(ErrorCode.INTERNAL, "the model is not loaded")
            self._waiting.append(job)
            self._wake.notify()

    def release(self, job: Job, hashes: list[int] | None) -> None:
        """The reader is done with ``job``: free its sequences (keeping its prompt, named ``hashes``)."""
        job.save_hashes = hashes
        job.stop.set()
        with self._wake:
            self._wake.notify()
        job.finished.wait()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self.ctx)

    @property
    def sequences_in_use(self) -> int:
        return self.n_seq - len(self._idle)

    # -- the scheduler thread --------------------------------------------------------------------

    def _loop(self) -> None:
        busy = False
        while True:
            with self._wake:
                if not busy and not self._closed:
                    # Idle: woken by a new job or a reader letting go; a caller's cancel is seen within 0.1 s.
                    self._wake.wait(timeout=0.1)
                if self._closed:
                    break
            try:
                self._retire()
                self._admit()
                busy = self._step()
            except Exception as exc:  # a decode that failed: every job on it ends with the error
                log.exception("batch_step_failed", error=repr(exc))
                for job in list(self._running):
                    self._fail(job, exc)
                busy = False
        for job in [*self._running, *self._waiting]:
            self._fail(job, LlmlbError(ErrorCode.MODEL_NOT_FOUND, "the model was unloaded"))

    def _fail(self, job: Job, exc: BaseException) -> None:
        job.out.put((-1, None, exc))
        self._end(job, save=False)

    def _retire(self) -> None:
        for job in list(self._running):
            if job.stop.is_set() or job.cancel.is_set():
                self._end(job, save=job.save_hashes is not None)
        for job in list(self._waiting):
            if job.stop.is_set() or job.cancel.is_set():
                self._waiting.remove(job)
                job.out.put((-1, None, None))
                job.finished.set()

    def _give_back(self, seq: int, kept: list[int]) -> None:
        self._idle.pop(seq, None)
        self._idle[seq] = kept  # the most recently used last

    def _end(self, job: Job, *, save: bool) -> None:
        """Frees the job's sequences; its own sequence keeps the aligned prompt for reuse."""
        for choice in job.choices:
            if choice.seq >= 0 and choice.seq != job.seq:
                self._clear(choice.seq)
                self._give_back(choice.seq, [])
            self._close_samplers(choice)
        job.choices.clear()
        if job in self._running:
            self._running.remove(job)
        if job.seq >= 0:
            n = aligned(min(job.evaluated, len(job.prompt)))
            if save and n and self._lib.llama_memory_seq_rm(self._mem, job.seq, n, -1):
                self._give_back(job.seq, job.prompt[:n])
                self._save(job.seq, job.prompt[:n], job.save_hashes or [])
            else:
                self._clear(job.seq)
                self._give_back(job.seq, [])
            job.seq = -1
        job.finished.set()

    def _clear(self, seq: int) -> None:
        self._lib.llama_memory_seq_rm(self._mem, seq, -1, -1)

    def _save(self, seq: int, tokens: list[int], hashes: list[int]) -> None:
        cache = self._cache
        if cache is None or not cache.enabled or cache.covers(tokens, hashes):
            return
        size = int(self._lib.llama_state_seq_get_size(self.ctx, seq))
        if not size or size > cache.budget_bytes:
            return
        buffer = (ctypes.c_uint8 * size)()
        written = int(self._lib.llama_state_seq_get_data(self.ctx, buffer, size, seq))
        if written:
            cache.add(tokens, bytes(memoryview(buffer)[:written]), hashes)

    def _admit(self) -> None:
        while self._waiting and self._idle:
            job = self._waiting.popleft()
            self._place(job)
            self._running.append(job)

    def _place(self, job: Job) -> None:
        """Gives the job the idle sequence holding most of its prompt, or restores a cached prefix."""
        tokens = job.prompt
        limit = aligned(len(tokens) - 1)  # at least one token is evaluated: fresh logits
        best_seq, best = -1, 0
        for seq, kept in self._idle.items():
            n = aligned(min(common_length(kept, tokens), limit))
            if n > best:
                best_seq, best = seq, n
        cache = self._cache
        entry, shared = cache.lookup(tokens) if cache is not None and cache.enabled else (None, 0)
        reuse = aligned(min(shared, limit))
        if best_seq >= 0 and best >= reuse:
            del self._idle[best_seq]
            self._lib.llama_memory_seq_rm(self._mem, best_seq, best, -1)
            job.seq, job.evaluated = best_seq, best
        else:
            job.seq = self._take()
            job.evaluated = 0
            if entry is not None and reuse > 0 and self._restore(job.seq, entry.state):
                self._lib.llama_memory_seq_rm(self._mem, job.seq, reuse, -1)
                job.evaluated = reuse
        job.cached = job.evaluated

    def _take(self) -> int:
        """An idle sequence, emptied: of those holding nothing, the one that widens the range of the
        sequences in use least; else the least recently used.

        llama.cpp decodes a batch over every sequence from its lowest to its highest id (their caches
        are kept apart): on gemma-3-270m 4 tokens in sequences 0, 2, 4 and 6 took 114 ms, in 0 to 3 63 ms.
        """
        empty = [s for s, kept in self._idle.items() if not kept]
        if not empty:
            seq = next(iter(self._idle))
        else:
            used = [s for s in range(self.n_seq) if s not in self._idle]
            lo, hi = (min(used), max(used)) if used else (0, 0)
            seq = min(empty, key=lambda s: (max(hi, s) - min(lo, s), s))
        del self._idle[seq]
        self._clear(seq)
        return seq

    def _restore(self, seq: int, state: bytes) -> bool:
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if not self._lib.llama_state_seq_set_data(self.ctx, buffer, len(state), seq):
            self._clear(seq)
            log.warning("prefix_restore_failed", bytes=len(state))
            return False
        return True

    def _new_choice(self, job: Job, seq: int) -> Choice:
        params = job.params
        index = job.started
        job.started += 1
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        if params.seed is not None and index:
            seed = params.seed + index  # choice i samples with seed + i, so the choices differ
        ids = np.zeros(len(job.prompt) + job.budget + 1, dtype=np.intc)
        ids[: len(job.prompt)] = job.prompt
        grammar = GrammarFilter(self.llm, job.grammar) if job.grammar else None
        choice = Choice(index, seq, None, grammar, ids, len(job.prompt), job.budget)

        def constrain(_ids: Any, scores: npt.NDArray[np.single]) -> Any:
            assert choice.grammar is not None
            return choice.grammar(choice.ids[: choice.n_ids], scores)

        settings = sampler_settings(params)
        greedy = (
            settings["temp"] == 0 and not settings["presence_penalty"] and not settings["frequency_penalty"]
        )
        if grammar is not None or not greedy:
            self.llm.set_seed(seed & 0xFFFFFFFF)
            choice.sampler = self.llm._init_sampler(
                **settings,
                logits_processor=[constrain] if grammar is not None else None,  # type: ignore[arg-type]
            )
        job.choices.append(choice)
        return choice

    def _prompt_done(self, job: Job) -> None:
        """The prompt's logits are fresh: choice 0 starts in the job's sequence, further choices in
        copies of it on idle sequences, all sampling from those logits."""
        first = self._new_choice(job, job.seq)
        copies = []
        while job.started < job.params.n and self._idle:
            seq = self._take()
            self._lib.llama_memory_seq_cp(self._mem, job.seq, seq, -1, -1)
            copies.append(self._new_choice(job, seq))
        for choice in (first, *copies):
            self._sample(job, choice, -1)

    def _next_choices(self) -> list[tuple[Job, Choice, list[tuple[int, int, int, bool]]]]:
        """Choices beyond those begun with the prompt: each needs the prompt's last partial block again."""
        out = []
        for job in self._running:
            if job.cancel.is_set() or job.stop.is_set() or not job.choices or job.started >= job.params.n:
                continue
            for done in [c for c in job.choices if c.done and c.seq >= 0]:
                if job.started >= job.params.n:
                    break
                seq, done.seq = done.seq, -1
                tail = aligned(len(job.prompt) - 1)
                if seq != job.seq:
                    self._lib.llama_memory_seq_cp(self._mem, job.seq, seq, -1, -1)
                self._lib.llama_memory_seq_rm(self._mem, seq, tail, -1)
                choice = self._new_choice(job, seq)
                chunk = [
                    (job.prompt[p], p, seq, p == len(job.prompt) - 1) for p in range(tail, len(job.prompt))
                ]
                out.append((job, choice, chunk))
        return out

    def _step(self) -> bool:
        """One step: prompt chunks, then one decode of every generating choice; False if none had work."""
        worked = False
        left = PREFILL_PER_STEP
        prefilling = [j for j in self._running if j.evaluated < len(j.prompt) and not j.cancel.is_set()]
        for job in sorted(prefilling, key=lambda j: len(j.prompt) - j.evaluated):
            if left < BLOCK:
                break
            start = job.evaluated  # aligned: a reuse point, or the end of an earlier whole block
            end = min(len(job.prompt), start + aligned(left))
            chunk = [(job.prompt[p], p, job.seq, p == len(job.prompt) - 1) for p in range(start, end)]
            left -= len(chunk)
            self._decode(chunk)
            self.prompt_tokens += len(chunk)
            job.evaluated = end
            worked = True
            if end == len(job.prompt):
                self._prompt_done(job)
        for job, choice, chunk in self._next_choices():
            self._decode(chunk)
            self.prompt_tokens += len(chunk)
            worked = True
            self._sample(job, choice, -1)
        decodes: list[tuple[Job, Choice]] = []
        for job in self._running:
            for choice in job.choices:
                if not choice.done and choice.index in job.halted:
                    self._finish(job, choice)
                if not choice.done and choice.pending >= 0:
                    decodes.append((job, choice))
        if not decodes:
            return worked
        groups = [[d] for d in decodes] if self.exact else [decodes]
        for group in groups:
            items = [(c.pending, c.n_ids - 1, c.seq, True) for _, c in group]
            self._decode(items)
            for row, (job, choice) in enumerate(group):
                self._sample(job, choice, row)
        return True

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of ``(token, position, sequence, wants logits)`` items."""
        batch = self._batch
        batch.n_tokens = len(items)
        for i, (token, pos, seq, wants) in enumerate(items):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = wants
        code = self._lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise LlmlbError(ErrorCode.INTERNAL, f"llama.cpp could not decode a batch (code {code})")

    def _sample(self, job: Job, choice: Choice, row: int) -> None:
        """Samples ``choice``'s next token from the logits at ``row`` of the last decode (-1: its last)."""
        if job.cancel.is_set() or job.stop.is_set():
            return
        logits: npt.NDArray[np.single] | None = None
        if choice.sampler is None:  # greedy: the first largest logit, as the chain's greedy sampler picks
            logits = self._logits(row)
            token = int(logits.argmax())
        else:
            token = int(self._lib.llama_sampler_sample(choice.sampler.sampler, self.ctx, row))
        logprob: TokenLogprob | None = None
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            self._finish(job, choice)
            return
        if job.params.logprobs:
            logits = self._logits(row) if logits is None else logits
            logprob = token_logprob(logits, token, job.params.top_logprobs, self._bytes)
        choice.produced += 1
        choice.ids[choice.n_ids] = token
        choice.n_ids += 1
        job.out.put((choice.index, token, logprob))
        if choice.produced >= choice.budget:
            self._finish(job, choice, length=True)
        else:
            choice.pending = token

    def _logits(self, row: int) -> npt.NDArray[np.single]:
        """The logits at ``row`` of the last decode (-1: its last), in llama.cpp's buffer."""
        pointer = self._lib.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def _bytes(self, token: int) -> bytes:
        return self.llm.detokenize([token], special=True)

    def _finish(self, job: Job, choice: Choice, *, length: bool = False) -> None:
        """Ends a choice; its sequence keeps what it holds until a later choice or the job's end."""
        choice.done = True
        choice.pending = -1
        job.out.put((choice.index, None, length))
        if choice.seq != job.seq and job.started >= job.params.n:
            self._clear(choice.seq)  # no later choice needs it
            self._give_back(choice.seq, [])
            choice.seq = -1
        self._close_samplers(choice)

    @staticmethod
    def _close_samplers(choice: Choice) -> None:
        if choice.sampler is not None:
            choice.sampler.close()
            choice.sampler = None
        if choice.grammar is not None:
            choice.grammar.close()
            choice.grammar = None
