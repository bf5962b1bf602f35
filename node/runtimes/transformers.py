"""Hugging Face ``transformers`` on PyTorch: chat, completion and embeddings from a safetensors folder.

The folder is the model's manifest files as fetched: ``config.json``, ``*.safetensors`` and the
tokenizer's files. The weights load once per model and are shared by every slot: each call keeps its
own key/value cache, so concurrent calls do not touch each other's state. Generation is a token loop
over the model's own forward pass (its ``cache`` carried between steps), so every step can see
the caller's ``CancelFlag``, apply stop sequences as text streams, and read log-probabilities.

This runtime serves CPU and Metal nodes (PyTorch's CPU build, or ``mps``); CUDA nodes serve safetensors
with vLLM (``node.runtimes.vllm``) when it is installed, else with this runtime on the GPU.

Just over 400 lines: sampling, penalties and log-probabilities are small functions of the one token
loop they serve, and read best beside it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import threading
from collections.abc import Generator, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog

from common.errors import ErrorCode, LlmlbError
from common.inference import (
    ChatRequest,
    CompleteRequest,
    EmbedRequest,
    FinishReason,
    ResponseFormatType,
    SamplingParams,
    TextChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from common.types import Backend, Capability, FileFormat
from node.runtimes.base import (
    CancelFlag,
    LoadContext,
    RuntimeSettings,
    RuntimeSpec,
    generation_budget,
    missing_file,
)
from node.runtimes.hf_folder import model_folder
from node.runtimes.llama import StopMatcher, normalize
from node.runtimes.llama_batch import DEFAULT_TEMPERATURE, DEFAULT_TOP_P

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

ENGINE = "transformers"
_MB = 1024 * 1024
# Bytes per weight of each dtype a config may name; the runtime loads float32 on the CPU (PyTorch's
# CPU kernels for half precision are slow or missing) and float16 on a GPU.
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}
# Activations, the key/value cache of a few thousand tokens and PyTorch's own allocations.
MEMORY_MARGIN_MB = 256
MEMORY_MARGIN_FRACTION = 0.2


def available(settings: RuntimeSettings) -> bool:
    """Whether this node can run the engine: PyTorch and transformers are installed (not imported yet)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def load_dtype(backend: Backend) -> str:
    return "float32" if backend is Backend.CPU else "float16"


def torch_device(backend: Backend) -> str:
    """Where the weights go: the GPU on CUDA (when vLLM is not installed) and Metal, else the CPU."""
    return {Backend.CUDA: "cuda", Backend.METAL: "mps"}.get(backend, "cpu")


def _file_dtype(config: dict[str, Any]) -> str:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(name).removeprefix("torch.")


class TransformersRuntime:
    """Chat, completion and embeddings for one safetensors causal language model."""

    engine = ENGINE
    capabilities = frozenset({Capability.CHAT, Capability.COMPLETION, Capability.EMBEDDING})

    def __init__(self, context: LoadContext) -> None:
        weights = context.files_of(FileFormat.SAFETENSORS)
        config = context.paths.get("config.json") or context.file_named("config.json")
        if not weights or config is None:
            raise missing_file(context.model.id, "safetensors weights and config.json")
        self.model_id = context.model.id
        self.folder = config.parent  # until load() finds the folder holding every file
        self._paths = dict(context.paths)
        self.settings: RuntimeSettings = context.settings
        self.fallback_template = context.model.chat_template
        self._weights_bytes = context.bytes_on_disk(FileFormat.SAFETENSORS)
        try:
            self._config: dict[str, Any] = json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            raise LlmlbError(
                ErrorCode.INTERNAL, f"{self.model_id!r}: config.json is unreadable: {exc}"
            ) from exc
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = "cpu"
        self._eos: frozenset[int] = frozenset()
        self._error: str | None = None
        self._lock = threading.Lock()  # load and unload against each other

    @property
    def sequences(self) -> int:
        """One: its calls do not batch, each runs its own forward passes on the same cores, so a
        second call at once only halves the first's speed. The balancer spreads them over nodes instead."""
        return 1

    @property
    def memory_mb(self) -> int:
        """Weights as loaded (their size on disk scaled from the file's dtype to the load dtype) plus a
        margin for activations and the key/value caches of the slots."""
        stored = _DTYPE_BYTES.get(_file_dtype(self._config), 4)
        loaded = _DTYPE_BYTES[load_dtype(self.settings.backend)]
        weights = self._weights_bytes * loaded / stored
        return math.ceil(weights * (1 + MEMORY_MARGIN_FRACTION) / _MB) + MEMORY_MARGIN_MB * max(
            1, self.settings.slots
        )

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with self._lock:
            if self.settings.threads:
                torch.set_num_threads(self.settings.threads)
            self._device = torch_device(self.settings.backend)
            dtype = getattr(torch, load_dtype(self.settings.backend))
            self.folder = model_folder(self._paths, self.model_id)
            try:
                tokenizer = AutoTokenizer.from_pretrained(self.folder)
                model: Any = AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype)
                model.to(self._device)
                model.eval()
            except Exception as exc:  # transformers raises many kinds for a folder it cannot read
                self._error = f"transformers could not load {self.model_id!r}: {exc}"
                raise LlmlbError(ErrorCode.INTERNAL, self._error) from exc
            self._tokenizer, self._model, self._error = tokenizer, model, None
            self._eos = frozenset(_eos_ids(model, tokenizer))
        log.info("model_loaded", engine=ENGINE, model_id=self.model_id, device=self._device)

    def unload(self) -> None:
        with self._lock:
            self._model = self._tokenizer = None

    def health(self) -> str | None:
        if self._error:
            return self._error
        return None if self._model is not None else "not loaded"

    def _loaded(self) -> tuple[Any, Any]:
        model, tokenizer = self._model, self._tokenizer
        if model is None or tokenizer is None:
            raise LlmlbError(ErrorCode.INTERNAL, f"model {self.model_id!r} is not loaded")
        return model, tokenizer

    # -- text ------------------------------------------------------------------------------------

    def chat_template(self) -> str:
        """The tokenizer's own template, else the catalogue's; ``invalid_request`` when there is neither."""
        _, tokenizer = self._loaded()
        template = getattr(tokenizer, "chat_template", None) or self.fallback_template
        if not template:
            raise LlmlbError(
                ErrorCode.INVALID_REQUEST,
                f"model {self.model_id!r} has no chat template (none with its tokenizer and none in its "
                "catalogue entry); use a completion, or register the model with a chat_template",
            )
        return str(template)

    def render_chat(self, request: ChatRequest) -> list[int]:
        _, tokenizer = self._loaded()
        template = self.chat_template()
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            prompt = tokenizer.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # the template's own raise_exception, or a template error
            raise LlmlbError(ErrorCode.INVALID_REQUEST, f"chat template refused the messages: {exc}") from exc
        bos = tokenizer.bos_token or ""
        add_special = not (bos and str(prompt).startswith(bos))
        return list(tokenizer(str(prompt), add_special_tokens=add_special)["input_ids"])

    def chat(self, request: ChatRequest, cancel: CancelFlag) -> Iterator[TextChunk]:
        if request.tools and request.tool_choice.mode.value != "none":
            raise _unsupported("tools")
        _check_params(request.params)
        tokens = self.render_chat(request)
        yield from self._choices(tokens, request.params, cancel)

    def complete(self, request: CompleteRequest, cancel: CancelFlag) -> Iterator[TextChunk]:
        _check_params(request.params)
        _, tokenizer = self._loaded()
        tokens = list(tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
        lead = request.prompt if request.echo else ""
        yield from self._choices(tokens, request.params, cancel, lead)

    def _choices(
        self, tokens: list[int], params: SamplingParams, cancel: CancelFlag, lead: str = ""
    ) -> Generator[TextChunk, None, None]:
        """One ``generate_text`` per choice; with a seed, choice i samples with seed + i. Usage: the
        prompt once, the choices' tokens summed, on the last choice's last chunk."""
        completion = 0
        for index in range(params.n):
            choice = params if params.seed is None or not index else replace(params, seed=params.seed + index)
            if lead:
                yield TextChunk(request_id="", delta=lead, index=index)
            for chunk in self.generate_text(tokens, choice, cancel):
                if chunk.usage is not None:
                    completion += chunk.usage.completion_tokens
                    last = index == params.n - 1 or cancel.is_set()
                    usage = Usage(prompt_tokens=len(tokens), completion_tokens=completion)
                    chunk = replace(chunk, usage=usage if last else None)
                yield replace(chunk, index=index)
            if cancel.is_set():  # nobody is waiting for the other choices
                return

    def context_tokens(self) -> int:
        limit = int(self._config.get("max_position_embeddings") or self.settings.context_tokens)
        return min(limit, self.settings.context_tokens)

    def generate_text(
        self, prompt: list[int], params: SamplingParams, cancel: CancelFlag
    ) -> Iterator[TextChunk]:
        """Streams text for ``prompt``: a chunk per piece of decoded text, then one with the finish reason
        and usage. The caller's ``cancel`` is checked before every forward step."""
        import torch

        model, tokenizer = self._loaded()
        n_ctx = self.context_tokens()
        budget = generation_budget(len(prompt), n_ctx, params.max_tokens)
        temperature = DEFAULT_TEMPERATURE if params.temperature is None else params.temperature
        top_p = DEFAULT_TOP_P if params.top_p is None else params.top_p
        generator = torch.Generator(device="cpu")
        generator.manual_seed(params.seed % 2**63 if params.seed is not None else random.getrandbits(63))
        stops = StopMatcher(params.stop)
        counts: dict[int, int] = {}
        produced: list[int] = []
        sent = ""  # decoded text already passed to the stop matcher
        pending: list[TokenLogprob] = []
        finish = FinishReason.LENGTH
        hit_stop = False
        with torch.inference_mode():
            ids = torch.tensor([prompt], device=self._device)
            out = model(input_ids=ids, use_cache=True)
            while len(produced) < budget:
                if cancel.is_set():
                    finish = FinishReason.CANCELLED
                    break
                logits = out.logits[0, -1].float().cpu()
                logits = _penalized(logits, counts, params)
                token = _pick(logits, temperature, top_p, generator)
                if token in self._eos:
                    finish = FinishReason.STOP
                    break
                produced.append(token)
                counts[token] = counts.get(token, 0) + 1
                if params.logprobs:
                    pending.append(_logprob(tokenizer, logits, token, params.top_logprobs))
                text = tokenizer.decode(produced, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # a character whose bytes are not all out yet waits
                    delta, sent = text[len(sent) :], text
                    piece, stopped = stops.feed(delta)
                    if piece or (pending and not stopped):
                        yield TextChunk(request_id="", delta=piece, logprobs=tuple(pending))
                        pending.clear()
                    if stopped:
                        finish, hit_stop = FinishReason.STOP, True
                        break
                if len(produced) >= budget:
                    break
                step = torch.tensor([[token]], device=self._device)
                out = model(input_ids=step, cache=out.cache, use_cache=True)
        tail = ""
        if not hit_stop:
            text = tokenizer.decode(produced, skip_special_tokens=True)
            tail = stops.flush(text[len(sent) :])
        yield TextChunk(
            request_id="",
            delta=tail,
            finish_reason=finish,
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=len(produced)),
            logprobs=tuple(pending),
        )

    # -- embeddings ------------------------------------------------------------------------------

    def embed(self, request: EmbedRequest) -> tuple[list[list[float]], Usage]:
        """The mean of the last hidden layer over each input's tokens, normalised to length 1."""
        import torch

        model, tokenizer = self._loaded()
        vectors: list[list[float]] = []
        prompt_tokens = 0
        limit = self.context_tokens()
        with torch.inference_mode():
            for index, text in enumerate(request.input):
                ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
                if len(ids) > limit:
                    raise LlmlbError(
                        ErrorCode.INVALID_REQUEST,
                        f"input {index} is {len(ids)} tokens; this node embeds at most {limit} tokens per "
                        "input (split the text)",
                    )
                prompt_tokens += len(ids)
                out = model(input_ids=torch.tensor([ids], device=self._device), output_hidden_states=True)
                mean = out.hidden_states[-1][0].float().mean(dim=0).cpu()
                vectors.append(normalize([float(x) for x in mean.tolist()][: request.dimensions]))
        return vectors, Usage(prompt_tokens=prompt_tokens)


def _unsupported(what: str) -> LlmlbError:
    return LlmlbError(
        ErrorCode.INVALID_REQUEST, f"{what} are not supported for safetensors models on this node's engine"
    )


def _check_params(params: SamplingParams) -> None:
    if params.response_format.type is not ResponseFormatType.TEXT:
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST,
            "response_format is not supported for safetensors models on this node's engine",
        )


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token that ends an answer: the generation config's, the model config's, the tokenizer's,
    and an end-of-turn token where the vocabulary has one (chat templates close turns with it)."""
    out: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            out.add(value)
        elif isinstance(value, list | tuple):
            out.update(int(v) for v in value)
    vocab = tokenizer.get_vocab()
    for name in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>"):
        if name in vocab:
            out.add(int(vocab[name]))
    return out


def _penalized(logits: torch.Tensor, counts: dict[int, int], params: SamplingParams) -> torch.Tensor:
    """OpenAI's presence and frequency penalties on the tokens generated so far."""
    presence, frequency = params.presence_penalty or 0.0, params.frequency_penalty or 0.0
    if not counts or (not presence and not frequency):
        return logits
    logits = logits.clone()
    for token, count in counts.items():
        logits[token] -= presence + frequency * count
    return logits


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0; else nucleus sampling at ``temperature`` from ``generator``."""
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the likelier tokens
        ordered[before >= top_p] = 0.0  # the smallest set whose mass reaches top_p stays
        probs = torch.zeros_like(probs).scatter(0, order, ordered)
    return int(torch.multinomial(probs, 1, generator=generator))


def _logprob(tokenizer: Any, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    import torch

    logprobs = torch.log_softmax(logits, dim=-1)

    def piece(t: int) -> tuple[str, bytes]:
        text = tokenizer.decode([t], skip_special_tokens=False)
        return text, text.encode("utf-8")

    text, raw = piece(token)
    alternatives: tuple[TopLogprob, ...] = ()
    if top:
        values, ids = torch.topk(logprobs, top)
        alternatives = tuple(
            _top(piece(int(i)), float(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True)
        )
    return TokenLogprob(token=text, logprob=float(logprobs[token]), bytes=raw, top_logprobs=alternatives)


def _top(piece: tuple[str, bytes], logprob: float) -> TopLogprob:
    return TopLogprob(token=piece[0], logprob=logprob, bytes=piece[1])


SPEC = RuntimeSpec(
    engine=ENGINE,
    formats=frozenset({FileFormat.SAFETENSORS}),
    capabilities=TransformersRuntime.capabilities,
    create=TransformersRuntime,
)
