"""llama.cpp through llama-cpp-python: chat, text completion and embeddings from one GGUF file.

With batching (the default) the model's slots are sequences of one context, decoded together by one
scheduler thread (``node.runtimes.llama_batch``). Without it a ``Llama`` object is one context and is
not thread-safe, so the runtime keeps one per concurrent slot, opened on demand; on the CPU and Metal
they share the memory-mapped weights. Embeddings always use contexts of their own.

Prompt prefixes are reused only at multiples of ``BLOCK`` tokens, the contexts' micro-batch size:
llama.cpp's numbers depend on how a prompt is split into micro-batches, so a prefix evaluated in
whole aligned blocks, followed by the rest from an aligned start, gives exactly what evaluating the
prompt cold would give, and greedy answers do not change with the cache. A context keeps, and the
model's ``PrefixCache`` saves, only the aligned part of each prompt (never generated tokens, which
were evaluated one at a time).

Over 400 lines on purpose: choosing the reuse point, generating and saving act on one leased context
and the model's cache together; the state copying itself lives in ``node.runtimes.llama_state``.
"""

from __future__ import annotations

import codecs
import math
import random
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from common.errors import ErrorCode, LlmlbError
from common.inference import (
    ChatMessage,
    ChatRequest,
    CompleteRequest,
    EmbedRequest,
    FinishReason,
    SamplingParams,
    TextChunk,
    TokenLogprob,
    Usage,
)
from common.prefixes import chat_prefixes, text_prefixes
from common.types import Backend, Capability, FileFormat
from node.runtimes.base import (
    CancelFlag,
    LoadContext,
    RuntimeSettings,
    RuntimeSpec,
    generation_budget,
    missing_file,
)
from node.runtimes.gguf import kv_cache_mb, read_gguf_metadata
from node.runtimes.grammar import response_grammar, tool_grammar
from node.runtimes.grammar_sampler import GrammarFilter
from node.runtimes.llama_batch import (
    BatchScheduler,
    Job,
    sampler_settings,
)
from node.runtimes.llama_state import BLOCK, aligned, clear, keep, restore, snapshot
from node.runtimes.llama_stream import read_job
from node.runtimes.logprobs import LogprobReader
from node.runtimes.prefix_cache import PrefixCache, common_length
from node.runtimes.stops import StopMatcher as StopMatcher  # where it lived before
from node.runtimes.tool_calls import offers_tools, read_calls, template_knows_tools, template_messages

if TYPE_CHECKING:
    from llama_cpp import Llama

log = structlog.get_logger(__name__)

ENGINE = "llama.cpp"
_MB = 1024 * 1024


def gpu_layers_for(backend: Backend, configured: int | None) -> int:
    """``n_gpu_layers`` for llama.cpp: every layer on a GPU backend unless configured, none on the CPU."""
    if backend in (Backend.CUDA, Backend.METAL):
        return -1 if configured is None else configured
    return 0


def engine_offloads() -> bool:
    """Whether the installed llama-cpp-python was built with a GPU backend (CUDA, Metal, ...)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


class _Contexts:
    """Idle ``Llama`` contexts of one kind; a new one opens when every existing one is busy."""

    def __init__(self, factory: Callable[[], Llama]) -> None:
        self._factory = factory
        self._idle: list[Llama] = []
        self._all: list[Llama] = []
        self._lock = threading.Lock()

    def acquire(self) -> Llama:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        llm = self._factory()
        with self._lock:
            self._all.append(llm)
        return llm

    def release(self, llm: Llama) -> None:
        with self._lock:
            if llm in self._all:
                self._idle.append(llm)

    def first(self) -> Llama:
        """A context to read model properties from (opens one if none is open)."""
        with self._lock:
            if self._all:
                return self._all[0]
        llm = self.acquire()
        self.release(llm)
        return llm

    def close(self) -> None:
        with self._lock:
            contexts, self._all, self._idle = self._all, [], []
        for llm in contexts:
            llm.close()


class LlamaRuntime:
    """Chat, completion and embeddings for one GGUF model."""

    engine = ENGINE
    capabilities = frozenset({Capability.CHAT, Capability.COMPLETION, Capability.EMBEDDING})

    def __init__(self, context: LoadContext) -> None:
        ggufs = context.files_of(FileFormat.GGUF)
        if not ggufs:
            raise missing_file(context.model.id, "GGUF")
        self.model_id = context.model.id
        self.path = ggufs[0]
        self.settings: RuntimeSettings = context.settings
        self.fallback_template = context.model.chat_template
        self.model_capabilities = frozenset(context.model.capabilities)
        self.gpu_layers = gpu_layers_for(self.settings.backend, self.settings.gpu_layers)
        if self.gpu_layers != 0 and not engine_offloads():
            log.warning(
                "llama_cpp.cpu_only_build",
                model_id=self.model_id,
                backend=self.settings.backend.value,
                hint="this llama-cpp-python was built without GPU support, so every layer runs on the "
                "CPU; reinstall it with CMAKE_ARGS=-DGGML_CUDA=on (or -DGGML_METAL=on), "
                "see docs/install.md",
            )
        self._metadata = read_gguf_metadata(self.path)
        self._generators: _Contexts | None = None
        self._embedders: _Contexts | None = None
        self._template: Any = None
        self._error: str | None = None
        self._listener = context.prefix_listener
        self._cache: PrefixCache | None = None
        self._model: Llama | None = None  # batching: the weights, tokenizer and vocabulary
        self._scheduler: BatchScheduler | None = None

    @property
    def memory_mb(self) -> int:
        weights = math.ceil(context_bytes(self.path) / _MB)
        slots = max(1, self.settings.slots)
        per_slot = kv_cache_mb(self._metadata, self.settings.context_tokens) + 64  # + compute buffers
        embedders = per_slot * slots if Capability.EMBEDDING in self.model_capabilities else 0
        if self.settings.batching:
            # One context: the KV cache of every slot's window, one set of compute buffers (sized by
            # the batch), and the small context of the object that holds the weights.
            generators = kv_cache_mb(self._metadata, self.settings.context_tokens * slots) + 128
        else:
            generators = per_slot * slots
        return weights + generators + embedders + self.settings.prefix_cache_mb

    @property
    def prefix_cache_bytes(self) -> int:
        """Bytes of saved prefix states held now (0 when not loaded)."""
        cache = self._cache
        return cache.bytes_held if cache is not None else 0

    @property
    def prompt_tokens_evaluated(self) -> int:
        """Prompt tokens the batched engine has put through the model (0 without batching)."""
        scheduler = self._scheduler
        return scheduler.prompt_tokens if scheduler is not None else 0

    def prefix_hashes(self) -> list[int]:
        """The names of the prefixes kept, most recently used first (see ``common.prefixes``)."""
        cache = self._cache
        return cache.hashes() if cache is not None else []

    def _open(self, embedding: bool, n_ctx: int = 0) -> Llama:
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN, LLAMA_POOLING_TYPE_UNSPECIFIED, Llama

        kwargs: dict[str, Any] = {"n_batch": n_ctx} if n_ctx else {}
        if not embedding:
            # Aligned micro-batches make reused prefixes exact; a full-size sliding-window cache (gemma 3)
            # keeps every position, so a context can be cut back to any block and saved whole.
            kwargs.update(n_ubatch=BLOCK, swa_full=True)
        if self.settings.threads:
            kwargs["n_threads"] = kwargs["n_threads_batch"] = self.settings.threads
        try:
            return Llama(
                model_path=str(self.path),
                n_ctx=n_ctx or self.settings.context_tokens,
                n_gpu_layers=self.gpu_layers,
                embedding=embedding,
                pooling_type=LLAMA_POOLING_TYPE_MEAN if embedding else LLAMA_POOLING_TYPE_UNSPECIFIED,
                verbose=False,
                **kwargs,
            )
        except ValueError as exc:  # llama-cpp-python's word for "the engine refused this file"
            raise LlmlbError(
                ErrorCode.INTERNAL, f"llama.cpp could not load {self.path.name} for {self.model_id!r}: {exc}"
            ) from exc

    def load(self) -> None:
        self._cache = PrefixCache(self.settings.prefix_cache_mb * _MB, self._report)
        self._generators = _Contexts(lambda: self._open(embedding=False))
        self._embedders = _Contexts(lambda: self._open(embedding=True))
        try:
            if self.settings.batching:
                # The model's own context is never decoded in: the scheduler makes the one that is.
                self._model = self._open(embedding=False, n_ctx=BLOCK)
                self._scheduler = BatchScheduler(
                    self._model,
                    sequences=self.settings.slots,
                    context_tokens=self.settings.context_tokens,
                    threads=self.settings.threads,
                    cache=self._cache,
                    exact=self.settings.batch_exact,
                )
            else:
                self._generators.first()  # fail here, at load, not on the first request
        except Exception as exc:
            self._error = str(exc)
            raise
        log.info("model_loaded", engine=ENGINE, model_id=self.model_id, gpu_layers=self.gpu_layers)

    def unload(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
        if self._model is not None:
            self._model.close()
            self._model = None
        for contexts in (self._generators, self._embedders):
            if contexts is not None:
                contexts.close()
        self._generators = self._embedders = None
        if self._cache is not None:  # a model loaded again never serves a stale prefix
            self._cache.clear()
            self._cache = None

    def _report(self) -> None:
        if self._listener is not None:
            self._listener.prefixes_changed(self.model_id, self.prefix_hashes())

    def health(self) -> str | None:
        if self._error:
            return self._error
        return None if self._generators is not None or self._scheduler is not None else "not loaded"

    # -- text ------------------------------------------------------------------------------------

    def _contexts(self, embedding: bool) -> _Contexts:
        contexts = self._embedders if embedding else self._generators
        if contexts is None:
            raise LlmlbError(ErrorCode.INTERNAL, f"model {self.model_id!r} is not loaded")
        return contexts

    def chat_template(self) -> str:
        """The GGUF's own template, else the catalogue's; ``invalid_request`` when there is neither."""
        template = str(self._metadata.get("tokenizer.chat_template", "")) or self.fallback_template
        if not template:
            raise LlmlbError(
                ErrorCode.INVALID_REQUEST,
                f"model {self.model_id!r} has no chat template (none in its GGUF and none in its catalogue "
                "entry); use a completion, or register the model with a chat_template",
            )
        return template

    def render_chat(self, llm: Llama, request: ChatRequest) -> list[int]:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        vocab = llm.metadata
        bos = _token_text(llm, llm.token_bos(), vocab.get("tokenizer.ggml.bos_token_id"))
        eos = _token_text(llm, llm.token_eos(), vocab.get("tokenizer.ggml.eos_token_id"))
        template = self.chat_template()
        formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        messages, tools = template_messages(request, template_knows_tools(template))
        try:
            prompt = formatter(messages=messages, tools=tools).prompt  # type: ignore[arg-type]
        except Exception as exc:  # the template's own raise_exception, or a template error
            raise LlmlbError(ErrorCode.INVALID_REQUEST, f"chat template refused the messages: {exc}") from exc
        add_bos = not (bos and prompt.startswith(bos))
        return llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)

    def chat(self, request: ChatRequest, cancel: CancelFlag) -> Iterator[TextChunk]:
        scheduler, model = self._scheduler, self._model
        if scheduler is not None and model is not None:
            tokens = self.render_chat(model, request)
            job = self._submit(scheduler, tokens, request.params, cancel, tool_grammar(request))
            hashes: list[int] | None = None
            try:
                stream = read_job(job, self._piece)
                answer = yield from (read_calls(stream) if offers_tools(request) else stream)
                names = chat_prefixes((*request.messages, ChatMessage("assistant", answer)))
                hashes = [p.hash for p in names]
            finally:
                scheduler.release(job, hashes)
            return
        contexts = self._contexts(False)
        llm = contexts.acquire()
        try:
            tokens = self.render_chat(llm, request)
            stream = self._generate(llm, tokens, request.params, cancel, grammar=tool_grammar(request))
            answer = yield from (read_calls(stream) if offers_tools(request) else stream)
            # The next turn of the conversation repeats this answer: name the prefix with it.
            names = chat_prefixes((*request.messages, ChatMessage("assistant", answer)))
            self._save(llm, tokens, [p.hash for p in names])
        finally:
            contexts.release(llm)

    def complete(self, request: CompleteRequest, cancel: CancelFlag) -> Iterator[TextChunk]:
        scheduler, model = self._scheduler, self._model
        if scheduler is not None and model is not None:
            tokens = model.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=False)
            grammar = response_grammar(request.params.response_format)
            job = self._submit(scheduler, tokens, request.params, cancel, grammar)
            hashes: list[int] | None = None
            try:
                lead = request.prompt if request.echo else ""
                answer = yield from read_job(job, self._piece, lead)
                hashes = [p.hash for p in text_prefixes(request.prompt + answer)]
            finally:
                scheduler.release(job, hashes)
            return
        contexts = self._contexts(False)
        llm = contexts.acquire()
        try:
            tokens = llm.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=False)
            lead = request.prompt if request.echo else ""
            grammar = response_grammar(request.params.response_format)
            answer = yield from self._generate(llm, tokens, request.params, cancel, lead, grammar=grammar)
            self._save(llm, tokens, [p.hash for p in text_prefixes(request.prompt + answer)])
        finally:
            contexts.release(llm)

    def _submit(
        self,
        scheduler: BatchScheduler,
        tokens: list[int],
        params: SamplingParams,
        cancel: CancelFlag,
        grammar: str | None,
    ) -> Job:
        """Hands a prompt to the scheduler; the prompt must leave room in one slot's window."""
        window = self.settings.context_tokens
        budget = generation_budget(len(tokens), window, params.max_tokens)
        if grammar:
            GrammarFilter(scheduler.llm, grammar).close()  # a grammar llama.cpp refuses fails here, alone
        job = Job(tokens, params, grammar, cancel, budget)
        scheduler.submit(job)
        return job

    def _piece(self, token: int) -> bytes:
        model = self._model
        assert model is not None
        return model.detokenize([token])

    # -- prefix reuse ----------------------------------------------------------------------------

    def _generate(
        self,
        llm: Llama,
        tokens: list[int],
        params: SamplingParams,
        cancel: CancelFlag,
        lead: str = "",
        *,
        grammar: str | None = None,
    ) -> Generator[TextChunk, None, str]:
        """``generate_text`` from the best aligned reuse point, once per choice; returns choice 0's text.

        The choices run in turn in this one context: each after the first finds the prompt's aligned part
        still held, so the prompt is evaluated about once. With a seed, choice i samples with seed + i, so
        the choices differ. Usage: the prompt counted once, the choices' tokens summed (OpenAI's way), on
        the last choice's last chunk. ``lead`` begins every choice's text (an echoed prompt); ``grammar``
        (GBNF) constrains every choice.
        """
        first = ""
        total: Usage | None = None
        for index in range(params.n):
            choice = params if params.seed is None or not index else replace(params, seed=params.seed + index)
            answer: list[str] = []
            try:
                if lead:
                    yield TextChunk(request_id="", delta=lead, index=index)
                cached = self._prepare(llm, tokens)
                for chunk in generate_text(llm, tokens, choice, cancel, cached=cached, grammar=grammar):
                    answer.append(chunk.delta)
                    if params.n > 1:
                        total = _summed(total, chunk.usage)
                        last = index == params.n - 1
                        chunk = replace(chunk, index=index, usage=total if last and chunk.usage else None)
                    yield chunk
            except BaseException:
                clear(llm)  # stopped part-way: what the context holds is not known to be whole
                raise
            if index == 0:
                first = "".join(answer)
            if cancel.is_set():  # nobody is waiting for the other choices
                break
        return first

    def _prepare(self, llm: Llama, tokens: list[int]) -> int:
        """Leaves the context holding the longest aligned prefix of ``tokens`` it can; returns its length.

        The prefix is shorter than the prompt, so at least one token is evaluated (fresh logits) and the
        last micro-batch starts aligned. The context's own tokens and the cache's entries compete.
        """
        limit = aligned(len(tokens) - 1)
        own = aligned(min(common_length(llm.input_ids[: llm.n_tokens].tolist(), tokens), limit))
        cache = self._cache
        entry, shared = cache.lookup(tokens) if cache is not None and cache.enabled else (None, 0)
        reuse = aligned(min(shared, limit))
        if entry is not None and reuse > own and restore(llm, entry.tokens, entry.state):
            return keep(llm, reuse)
        return keep(llm, own)

    def _save(self, llm: Llama, tokens: list[int], hashes: list[int]) -> None:
        """Cuts the context back to the prompt's aligned part and saves that state, named ``hashes``."""
        n = aligned(len(tokens))
        if llm.n_tokens < n or keep(llm, n) == 0:
            clear(llm)
            return
        cache = self._cache
        if cache is None or not cache.enabled or cache.covers(tokens[:n], hashes):
            return
        state = snapshot(llm, cache.budget_bytes)
        if state is not None:
            cache.add(tokens[:n], state, hashes)

    # -- embeddings ------------------------------------------------------------------------------

    def embed(self, request: EmbedRequest) -> tuple[list[list[float]], Usage]:
        contexts = self._contexts(True)
        llm = contexts.acquire()
        try:
            # llama.cpp embeds one input in one batch: longer inputs would be cut short without a word.
            limit = min(llm.n_ctx(), llm.n_batch)
            prompt_tokens = 0
            for index, text in enumerate(request.input):
                n = len(llm.tokenize(text.encode("utf-8"), add_bos=True))
                if n > limit:
                    raise LlmlbError(
                        ErrorCode.INVALID_REQUEST,
                        f"input {index} is {n} tokens; this node embeds at most {limit} tokens per input "
                        "(split the text)",
                    )
                prompt_tokens += n
            raw = llm.embed(list(request.input), normalize=False, truncate=False)
        finally:
            contexts.release(llm)
        vectors = [normalize([float(x) for x in v][: request.dimensions]) for v in raw]  # type: ignore[union-attr]
        return vectors, Usage(prompt_tokens=prompt_tokens)


def generate_text(
    llm: Llama,
    prompt: list[int],
    params: SamplingParams,
    cancel: CancelFlag,
    *,
    cached: int = 0,
    grammar: str | None = None,
) -> Iterator[TextChunk]:
    """Streams text for ``prompt``: one chunk per decoded piece, then one with finish reason and usage.

    ``cached`` is how many of the prompt's first tokens the context already holds (for the usage);
    ``grammar`` (GBNF, see ``node.runtimes.grammar``) constrains what may be sampled.
    """
    import llama_cpp

    n_ctx = llm.n_ctx()
    budget = generation_budget(len(prompt), n_ctx, params.max_tokens)
    llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
    stops = StopMatcher(params.stop)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    vocab = llm._model.vocab  # the generator yields ids; llama.cpp alone knows which end generation
    reader = LogprobReader(llm, params.top_logprobs) if params.logprobs else None
    pending: list[TokenLogprob] = []  # entries of tokens whose text is not sent yet
    produced = 0
    finish = FinishReason.LENGTH
    hit_stop = False  # a stop sequence, whose held-back prefix is dropped; end-of-generation keeps it
    constrained = GrammarFilter(llm, grammar) if grammar else None
    tokens = llm.generate(
        prompt,
        **sampler_settings(params),
        logits_processor=[constrained] if constrained is not None else None,  # type: ignore[arg-type]
    )
    try:
        for token in tokens:
            if cancel.is_set():
                finish = FinishReason.CANCELLED
                break
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = FinishReason.STOP
                break
            produced += 1
            if reader is not None:  # now, before the generator evaluates the token
                pending.append(reader.read(token))
            text, stopped = stops.feed(decoder.decode(llm.detokenize([token])))
            if text:
                yield TextChunk(request_id="", delta=text, logprobs=tuple(pending))
                pending.clear()
            if stopped:
                finish, hit_stop = FinishReason.STOP, True
                break
            if produced >= budget:
                break
    finally:
        tokens.close()
        if constrained is not None:
            constrained.close()
    tail = "" if hit_stop else stops.flush(decoder.decode(b"", final=True))
    yield TextChunk(
        request_id="",
        delta=tail,
        finish_reason=finish,
        usage=Usage(prompt_tokens=len(prompt), completion_tokens=produced, cached_tokens=cached),
        logprobs=tuple(pending),
    )


def _summed(total: Usage | None, usage: Usage | None) -> Usage | None:
    """Usage of several choices of one prompt: its tokens (and cached ones) once, the answers' summed."""
    if usage is None or total is None:
        return usage or total
    return replace(total, completion_tokens=total.completion_tokens + usage.completion_tokens)


def context_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else vector


def _token_text(llm: Llama, token: int, declared: Any) -> str:
    if token < 0 and declared is None:
        return ""
    return llm.detokenize([token], special=True).decode("utf-8", errors="ignore")


SPEC = RuntimeSpec(
    engine=ENGINE,
    formats=frozenset({FileFormat.GGUF}),
    capabilities=LlamaRuntime.capabilities,
    create=LlamaRuntime,
)
