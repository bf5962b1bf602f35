"""A batched request's tokens as text chunks: what ``generate_text`` streams, read from a scheduler job.

The scheduler samples every choice of a request at once; the reader turns each choice's tokens into
text (stop sequences, UTF-8 pieces, log-probabilities) and sends the choices one after another, as a
request running alone would: choice 0 streams live, later choices' chunks wait until the earlier ones
end. Usage: the prompt counted once, the choices' tokens summed, on the very last chunk.
"""

from __future__ import annotations

import codecs
import queue
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any

from common.inference import FinishReason, TextChunk, TokenLogprob, Usage
from node.runtimes.llama_batch import Job
from node.runtimes.stops import StopMatcher

POLL_S = 0.1  # how often a reader waiting for tokens looks at its caller's cancel flag


@dataclass(eq=False)
class _ChoiceText:
    index: int
    stops: StopMatcher
    decoder: Any
    chunks: list[TextChunk] = field(default_factory=list)
    pending: list[TokenLogprob] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    produced: int = 0
    finish: FinishReason | None = None
    hit_stop: bool = False


def read_job(job: Job, detokenize: Callable[[int], bytes], lead: str = "") -> Generator[TextChunk, None, str]:
    """Streams the job's choices in order; returns choice 0's text. ``lead`` begins every choice."""
    params = job.params
    n = params.n
    texts = [
        _ChoiceText(i, StopMatcher(params.stop), codecs.getincrementaldecoder("utf-8")(errors="replace"))
        for i in range(n)
    ]
    for choice in texts:
        if lead:
            choice.chunks.append(TextChunk(request_id="", delta=lead, index=choice.index))
    current = 0
    total: Usage | None = None
    while current < n:
        # Send what the current choice has, and move on past every choice already ended.
        while current < n:
            choice = texts[current]
            for chunk in choice.chunks:
                if n > 1:
                    total = _summed(total, chunk.usage)
                    last = current == n - 1
                    chunk = replace(chunk, usage=total if last and chunk.usage else None)
                yield chunk
            choice.chunks.clear()
            if choice.finish is None:
                break
            if choice.finish is FinishReason.CANCELLED:
                return "".join(texts[0].text)  # nobody is waiting for the other choices
            current += 1
        if current >= n:
            break
        try:
            index, token, extra = job.out.get(timeout=POLL_S)
        except queue.Empty:
            if job.cancel.is_set():
                _end(texts[current], job, FinishReason.CANCELLED)
            continue
        if index < 0:
            if isinstance(extra, BaseException):
                raise extra
            _end(texts[current], job, FinishReason.CANCELLED)
            continue
        choice = texts[index]
        if choice.finish is not None:
            continue  # tokens sampled after a stop sequence was found
        if job.cancel.is_set():
            _end(texts[current], job, FinishReason.CANCELLED)
            continue
        if token is None:
            _end(choice, job, FinishReason.LENGTH if extra else FinishReason.STOP)
            continue
        choice.produced += 1
        if extra is not None:
            choice.pending.append(extra)
        text, stopped = choice.stops.feed(choice.decoder.decode(detokenize(token)))
        if text:
            choice.text.append(text)
            chunk = TextChunk(request_id="", delta=text, logprobs=tuple(choice.pending), index=index)
            choice.chunks.append(chunk)
            choice.pending.clear()
        if stopped:
            choice.hit_stop = True
            job.halted.add(index)
            _end(choice, job, FinishReason.STOP)
    return "".join(texts[0].text)


def _end(choice: _ChoiceText, job: Job, finish: FinishReason) -> None:
    if choice.finish is not None:
        return
    choice.finish = finish
    tail = "" if choice.hit_stop else choice.stops.flush(choice.decoder.decode(b"", final=True))
    if tail:
        choice.text.append(tail)
    usage = Usage(prompt_tokens=len(job.prompt), completion_tokens=choice.produced, cached_tokens=job.cached)
    choice.chunks.append(
        TextChunk(
            request_id="",
            delta=tail,
            finish_reason=finish,
            usage=usage,
            logprobs=tuple(choice.pending),
            index=choice.index,
        )
    )
    choice.pending.clear()


def _summed(total: Usage | None, usage: Usage | None) -> Usage | None:
    """Usage of several choices of one prompt: its tokens (and cached ones) once, the answers' summed."""
    if usage is None or total is None:
        return usage or total
    return replace(total, completion_tokens=total.completion_tokens + usage.completion_tokens)
