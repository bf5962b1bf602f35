"""vLLM as a supervised child process: chat and completions from a safetensors folder on CUDA nodes.

The node starts ``python -m vllm.entrypoints.openai.api_server`` (or ``XLLM_VLLM_COMMAND``) on a free
port of 127.0.0.1, waits for its ``GET /health``, and proxies calls to its OpenAI API with httpx,
streaming. A watcher thread restarts the server when it dies (a few times, then the model reports
failed); ``unload`` stops it. The key/value cache use comes from its Prometheus ``/metrics``.

Chosen on a CUDA node where ``vllm`` is importable, or anywhere ``XLLM_VLLM_COMMAND`` names the command
(which is how its wiring is tested without a GPU). Calls here are blocking, as every runtime's are: the
pool runs them on its worker threads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import structlog

from common.errors import ErrorCode, LlmlbError
from common.inference import (
    ChatRequest,
    CompleteRequest,
    FinishReason,
    ResponseFormatType,
    SamplingParams,
    TextChunk,
    Usage,
)
from common.types import Backend, Capability, FileFormat
from node.runtimes.base import CancelFlag, LoadContext, RuntimeSettings, RuntimeSpec, missing_file
from node.runtimes.hf_folder import model_folder

log = structlog.get_logger(__name__)

ENGINE = "vllm"
DEFAULT_COMMAND = (sys.executable, "-m", "vllm.entrypoints.openai.api_server")
START_TIMEOUT_S = 600.0  # vLLM compiles kernels and profiles memory before it answers /health
MAX_RESTARTS = 3  # a server that keeps dying is reported failed instead
METRICS_EVERY_S = 2.0  # how often the server's key/value cache use is read for heartbeats
_MB = 1024 * 1024
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "tool_calls": FinishReason.TOOL_CALLS}
_KV_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def available(settings: RuntimeSettings) -> bool:
    """A command is configured, or this is a CUDA node with vLLM installed."""
    if settings.vllm_command:
        return True
    return settings.backend is Backend.CUDA and importlib.util.find_spec("vllm") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmRuntime:
    """Chat and completions for one safetensors model, served by a vLLM child process."""

    engine = ENGINE
    capabilities = frozenset({Capability.CHAT, Capability.COMPLETION})

    def __init__(self, context: LoadContext) -> None:
        config = context.paths.get("config.json") or context.file_named("config.json")
        if not context.files_of(FileFormat.SAFETENSORS) or config is None:
            raise missing_file(context.model.id, "safetensors weights and config.json")
        self.model_id = context.model.id
        self.folder = config.parent  # until load() finds the folder holding every file
        self._paths = dict(context.paths)
        self.settings = context.settings
        self.chat_template = context.model.chat_template
        self._weights_bytes = context.bytes_on_disk(FileFormat.SAFETENSORS)
        self._command = (
            shlex.split(self.settings.vllm_command) if self.settings.vllm_command else list(DEFAULT_COMMAND)
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._port = 0
        self._stopping = threading.Event()
        self._error: str | None = None
        self._restarts = 0
        self._kv_cache: float | None = None
        self._template_file: Path | None = None
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=httpx.Timeout(10.0, read=None))

    @property
    def memory_mb(self) -> int:
        """Weights as stored (vLLM loads them in their own dtype) plus a fifth and a cache margin."""
        return math.ceil(self._weights_bytes * 1.2 / _MB) + 1024

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    # -- lifecycle -------------------------------------------------------------------------------

    def load(self) -> None:
        self.folder = model_folder(self._paths, self.model_id)
        self._stopping.clear()
        self._start()
        self._watcher = threading.Thread(target=self._watch, name=f"vllm-{self.model_id}", daemon=True)
        self._watcher.start()

    def _start(self) -> None:
        """Starts the server and waits for its /health; ``internal_error`` with its log's tail if not."""
        with self._lock:
            self._port = free_port()
            args = [
                *self._command,
                "--model",
                str(self.folder),
                "--served-model-name",
                self.model_id,
                "--host",
                "127.0.0.1",
                "--port",
                str(self._port),
            ]
            if self.chat_template:  # the catalogue's; written out, as the model's folder may be read-only
                if self._template_file is None:
                    with tempfile.NamedTemporaryFile("w", suffix=".jinja", delete=False) as f:
                        f.write(self.chat_template)
                    self._template_file = Path(f.name)
                args += ["--chat-template", str(self._template_file)]
            self._log_file = tempfile.TemporaryFile(prefix="vllm-")  # noqa: SIM115 (lives with the process)
            self._process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT
            )
            process = self._process
        log.info("vllm_starting", model_id=self.model_id, port=self._port, pid=process.pid)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not self._stopping.is_set():
            if process.poll() is not None:
                self._error = f"vLLM exited with {process.returncode} while starting: {self._log_tail()}"
                raise LlmlbError(ErrorCode.INTERNAL, self._error)
            with contextlib.suppress(httpx.HTTPError):
                if self._client.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    self._error = None
                    log.info("model_loaded", engine=ENGINE, model_id=self.model_id, port=self._port)
                    return
            time.sleep(0.2)
        self._stop_process()
        self._error = f"vLLM did not answer /health within {START_TIMEOUT_S:.0f} s"
        raise LlmlbError(ErrorCode.INTERNAL, self._error)

    def _watch(self) -> None:
        """Reads the server's cache use every ``METRICS_EVERY_S``; restarts a server that died, up to
        ``MAX_RESTARTS`` times, after which the model is failed."""
        next_read = 0.0
        while not self._stopping.is_set():
            process = self._process
            if process is None or process.poll() is None:
                if process is not None and time.monotonic() >= next_read:
                    self._read_kv_cache()
                    next_read = time.monotonic() + METRICS_EVERY_S
                self._stopping.wait(0.5)
                continue
            if self._stopping.is_set():
                return
            self._restarts += 1
            log.warning("vllm_died", model_id=self.model_id, code=process.returncode, restarts=self._restarts)
            if self._restarts > MAX_RESTARTS:
                self._error = f"vLLM died {self._restarts} times; last: {self._log_tail()}"
                return
            self._error = "vLLM is restarting"
            try:
                self._start()
            except LlmlbError as exc:
                log.warning("vllm_restart_failed", model_id=self.model_id, error=exc.message)

    def unload(self) -> None:
        self._stopping.set()
        self._stop_process()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
        if self._template_file is not None:
            self._template_file.unlink(missing_ok=True)
            self._template_file = None

    def _stop_process(self) -> None:
        with self._lock:
            process, self._process = self._process, None
            log_file, self._log_file = self._log_file, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if log_file is not None:
            log_file.close()

    def _log_tail(self, limit: int = 2000) -> str:
        log_file = self._log_file
        if log_file is None:
            return ""
        try:
            log_file.seek(0)
            return bytes(log_file.read()[-limit:]).decode("utf-8", errors="replace").strip()
        except (OSError, ValueError):
            return ""

    def health(self) -> str | None:
        if self._error:
            return self._error
        return None if self.pid is not None else "not loaded"

    @property
    def kv_cache_usage(self) -> float | None:
        """The share (0..1) of the server's key/value cache in use, as the watcher last read it from
        its /metrics (heartbeats read this without waiting on the server); None if not known."""
        return self._kv_cache if self.pid is not None else None

    def _read_kv_cache(self) -> None:
        try:
            self._kv_cache = kv_cache_usage(self._client.get(f"{self.base_url}/metrics", timeout=2.0).text)
        except httpx.HTTPError:
            self._kv_cache = None

    # -- text ------------------------------------------------------------------------------------

    def chat(self, request: ChatRequest, cancel: CancelFlag) -> Iterator[TextChunk]:
        if request.tools and request.tool_choice.mode.value != "none":
            raise LlmlbError(ErrorCode.INVALID_REQUEST, "tools are not supported for models served by vLLM")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        body = {"messages": messages, **_params(request.params)}
        yield from self._stream("/v1/chat/completions", body, cancel, chat=True)

    def complete(self, request: CompleteRequest, cancel: CancelFlag) -> Iterator[TextChunk]:
        body = {"prompt": request.prompt, "echo": request.echo, **_params(request.params)}
        yield from self._stream("/v1/completions", body, cancel, chat=False)

    def _stream(
        self, path: str, body: dict[str, Any], cancel: CancelFlag, *, chat: bool
    ) -> Iterator[TextChunk]:
        """Streams vLLM's SSE answer as chunks; closing the response (cancel) aborts vLLM's request."""
        if self.pid is None:
            raise LlmlbError(
                ErrorCode.UNAVAILABLE, self._error or f"vLLM for {self.model_id!r} is not running"
            )
        body = {**body, "model": self.model_id, "stream": True, "stream_options": {"include_usage": True}}
        finish: dict[int, FinishReason] = {}
        usage: Usage | None = None
        n = int(body.get("n", 1))
        try:
            with self._client.stream("POST", f"{self.base_url}{path}", json=body) as response:
                if response.status_code != 200:
                    raise _refused(response.status_code, response.read())
                for line in response.iter_lines():
                    if cancel.is_set():
                        for index in range(n):
                            finish.setdefault(index, FinishReason.CANCELLED)
                        break
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if event.get("usage"):
                        u = event["usage"]
                        usage = Usage(
                            prompt_tokens=int(u.get("prompt_tokens", 0)),
                            completion_tokens=int(u.get("completion_tokens", 0)),
                        )
                    for choice in event.get("choices") or []:
                        index = int(choice.get("index", 0))
                        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                        if text:
                            yield TextChunk(request_id="", delta=str(text), index=index)
                        if choice.get("finish_reason"):
                            finish[index] = _FINISH.get(str(choice["finish_reason"]), FinishReason.STOP)
        except httpx.HTTPError as exc:
            raise LlmlbError(ErrorCode.UNAVAILABLE, f"vLLM for {self.model_id!r} failed: {exc}") from exc
        for index in range(n):
            last = index == n - 1
            yield TextChunk(
                request_id="",
                delta="",
                index=index,
                finish_reason=finish.get(index, FinishReason.STOP),
                usage=(usage or Usage()) if last else None,
            )


def _params(params: SamplingParams) -> dict[str, Any]:
    """OpenAI sampling fields for vLLM; unset ones are left to its defaults."""
    if params.response_format.type is not ResponseFormatType.TEXT:
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST, "response_format is not supported for models served by vLLM"
        )
    if params.logprobs:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, "logprobs are not supported for models served by vLLM")
    out: dict[str, Any] = {"n": params.n}
    for name in ("max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if value is not None:
            out[name] = value
    if params.stop:
        out["stop"] = list(params.stop)
    return out


def _refused(status: int, body: bytes) -> LlmlbError:
    """vLLM's error answer in our vocabulary: its 4xx are the caller's, anything else is ours."""
    try:
        message = str(json.loads(body).get("message") or json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError, AttributeError):
        message = body.decode("utf-8", errors="replace")[:300]
    code = ErrorCode.INVALID_REQUEST if 400 <= status < 500 else ErrorCode.UNAVAILABLE
    return LlmlbError(code, f"vLLM refused the request: {message}")


def kv_cache_usage(metrics: str) -> float | None:
    """The largest key/value cache use among vLLM's gauges in a Prometheus text page (0..1)."""
    values: list[float] = []
    for line in metrics.splitlines():
        if line.startswith(_KV_METRICS):
            with contextlib.suppress(ValueError, IndexError):
                values.append(float(line.rsplit(" ", 1)[1]))
    return max(values) if values else None


SPEC = RuntimeSpec(
    engine=ENGINE,
    formats=frozenset({FileFormat.SAFETENSORS}),
    capabilities=VllmRuntime.capabilities,
    create=VllmRuntime,
)
