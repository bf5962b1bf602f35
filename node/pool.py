"""The node's loaded models: load on first use, keep warm, evict the least recently used past a memory budget.

Requests take one of two paths, whatever their kind (``node.kinds``): ``unary`` for an answer given at
once, ``stream`` for one given item by item. Each loaded model has a fixed number of slots (concurrent
calls into its runtime); requests beyond them wait in a bounded queue. Loading, unloading and inference
all run on a bounded thread pool, never on the event loop. A call whose caller goes away stops at the
runtime's next step and gives its slot back as soon as the runtime has stopped.

Spans (``common.tracing``), children of the request's: ``slot`` (the wait for the model to be loaded and
a slot free), ``load`` (a load the request started; a prefetch's load is a trace of its own) and
``runtime`` (the call into the runtime on its worker thread).

Over 400 lines on purpose: loading, the memory budget, eviction and slot leases all act on the same
entries under the same condition, and split apart they would have to share those internals.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import structlog

from common import tracing
from common.config import PoolSettings as PoolSettings  # its home before the settings schema
from common.errors import ErrorCode, LlmlbError
from common.inference import InferenceRequest
from common.types import Backend, Capability, Model, ModelState
from node.hardware import Hardware
from node.kinds import Kind, Serving
from node.runtimes.base import (
    CancelFlag,
    FewerSequences,
    KvCacheReporting,
    LoadContext,
    PrefixCaching,
    PrefixListener,
    Runtime,
    RuntimeSettings,
)
from node.runtimes.engines import Engines
from node.threads import FreshThreadExecutor

log = structlog.get_logger(__name__)
R = TypeVar("R", bound=InferenceRequest)
T = TypeVar("T")


class ResolvedModel(Protocol):
    """A model whose files are on this node: what the resolver hands the pool."""

    @property
    def model(self) -> Model: ...

    @property
    def paths(self) -> Mapping[str, Path]:
        """Manifest filename -> absolute path of the file on disk (may lie outside the models dir)."""
        ...


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One loaded (or loading, or failed) model, as ``ModelPool.details`` reports it."""

    model_id: str
    engine: str
    state: ModelState
    error: str  # why the last load failed; empty unless state is FAILED
    memory_mb: int
    active: int  # requests holding a slot
    waiting: int  # requests queued for a slot or for the load
    pinned: bool = False  # a scheduled copy: never evicted for an on-demand load


@dataclass(eq=False)
class _Entry:
    model_id: str
    engine: str
    create: Callable[[], Runtime]  # builds the runtime; reads file headers, so it runs on a worker thread
    slots: asyncio.Semaphore
    runtime: Runtime | None = None  # set by the load, before the memory budget is consulted
    memory_mb: int = 0
    state: ModelState = ModelState.LOADING
    error: LlmlbError | None = None
    active: int = 0
    waiting: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False
    admitted: bool = False  # counted against the memory budget (set before its load starts)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    cancels: set[CancelFlag] = field(default_factory=set)
    files: tuple[tuple[str, int, int, int], ...] = ()  # what it was loaded from: name, inode, mtime, size

    def holds_memory(self) -> bool:
        return self.admitted and self.state is not ModelState.FAILED


class _Lease:
    """A slot in one loaded model, held for the length of one request."""

    def __init__(self, entry: _Entry) -> None:
        self.entry = entry

    @property
    def runtime(self) -> Runtime:
        assert self.entry.runtime is not None  # a lease is granted only once the load has succeeded
        return self.entry.runtime


_ITEM, _ERROR, _END = 0, 1, 2


def _signature(paths: Mapping[str, Path]) -> tuple[tuple[str, int, int, int], ...]:
    """Each file's identity on disk: a refetched or rewritten file gets a new inode or mtime."""
    out = []
    for name in sorted(paths):
        try:
            st = paths[name].stat()
        except OSError:
            out.append((name, -1, -1, -1))
            continue
        out.append((name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class ModelPool:
    """Loaded models of one node, and the only way requests reach a runtime."""

    def __init__(
        self,
        hardware: Hardware,
        settings: PoolSettings | None = None,
        engines: Engines | None = None,
    ) -> None:
        self.hardware = hardware
        self.settings = settings or PoolSettings()
        self.engines = engines or Engines.default(self._runtime_settings())
        self.budget_mb = self.settings.budget_mb(hardware)
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        # Out of use but not yet unloaded (finishing requests, or being unloaded): still in memory.
        self._leaving: set[_Entry] = set()
        self._failed: dict[str, LlmlbError] = {}
        # Models the balancer's scheduler placed here: kept loaded until it unloads them.
        self._pinned: set[str] = set()
        self._memory = asyncio.Condition()
        # A thread per call, not a long-lived pool: see node/threads.py for what that saves.
        self._executor = FreshThreadExecutor(self.settings.worker_threads, "xllm-run")
        self._closed = False
        self._loads = 0  # runtime loads in progress: a load's growth is measured only when alone
        # Told whenever a loaded model's kept prompt prefixes change (the balancer link); set before use.
        self.prefix_listener: PrefixListener | None = None

    # -- state for heartbeats --------------------------------------------------------------------

    def states(self) -> dict[str, ModelState]:
        """Model id -> loading, ready or failed for every model this pool knows.

        A model that failed to load stays failed (with its message in ``errors()``) until a later
        request loads it; an unloaded or evicted model is absent.
        """
        states = {model_id: ModelState.FAILED for model_id in self._failed}
        for entry in self._entries.values():
            states[entry.model_id] = entry.state
        return states

    def errors(self) -> dict[str, str]:
        """Model id -> the message of its failed load, for each model ``states()`` reports as failed."""
        return {model_id: error.message for model_id, error in self._failed.items()}

    def details(self) -> list[ModelStatus]:
        """Every model the pool holds, with its memory, slots in use and queue."""
        out = [
            ModelStatus(
                model_id=e.model_id,
                engine=e.engine,
                state=e.state,
                error=e.error.message if e.error else "",
                memory_mb=e.memory_mb,
                active=e.active,
                waiting=e.waiting,
                pinned=e.model_id in self._pinned,
            )
            for e in self._entries.values()
        ]
        return sorted(out, key=lambda s: s.model_id)

    def prefix_cache_bytes(self) -> dict[str, int]:
        """Model id -> bytes of computed prompt prefixes its runtime keeps, for each model that keeps any."""
        out: dict[str, int] = {}
        for e in self._entries.values():
            if e.state is ModelState.READY and isinstance(e.runtime, PrefixCaching):
                out[e.model_id] = out.get(e.model_id, 0) + e.runtime.prefix_cache_bytes
        return out

    def kv_cache_usage(self) -> dict[str, float]:
        """Model id -> the share (0..1) of its model server's key/value cache in use, where one reports it."""
        out: dict[str, float] = {}
        for e in self._entries.values():
            if e.state is ModelState.READY and isinstance(e.runtime, KvCacheReporting):
                usage = e.runtime.kv_cache_usage
                if usage is not None:
                    out[e.model_id] = max(out.get(e.model_id, 0.0), usage)
        return out

    def slots_by_model(self) -> dict[str, int]:
        """Model id -> sequences its loaded runtime runs at once, for each ready model: the pool's slots
        per model, or fewer where the runtime runs fewer (``FewerSequences``). The balancer sends no
        more calls for the model than this (plus its queue allowance)."""
        out: dict[str, int] = {}
        for e in self._entries.values():
            if e.state is ModelState.READY and e.runtime is not None:
                out[e.model_id] = max(out.get(e.model_id, 0), self._sequences(e.runtime))
        return out

    def _sequences(self, runtime: Runtime) -> int:
        slots = self.settings.slots_per_model
        return max(1, min(slots, runtime.sequences)) if isinstance(runtime, FewerSequences) else slots

    @property
    def used_mb(self) -> int:
        return sum(e.memory_mb for e in self._holding())

    def memory_by_model(self) -> dict[str, int]:
        """Model id -> MB its loaded (or loading) runtimes take, for each model holding memory."""
        out: dict[str, int] = {}
        for e in self._holding():
            out[e.model_id] = out.get(e.model_id, 0) + e.memory_mb
        return out

    def pin(self, model_id: str, pinned: bool = True) -> None:
        """Marks the model kept for the scheduler (or no longer) before it loads, e.g. while it downloads."""
        (self._pinned.add if pinned else self._pinned.discard)(model_id)

    def pinned(self) -> frozenset[str]:
        """The models kept loaded for the balancer's scheduler (see ``prefetch``)."""
        return frozenset(self._pinned)

    def _holding(self) -> list[_Entry]:
        """Every entry whose runtime holds memory now, including those on their way out."""
        held = [e for e in self._entries.values() if e.holds_memory()]
        return held + [e for e in self._leaving if e.holds_memory()]

    # -- lifecycle -------------------------------------------------------------------------------

    def _runtime_settings(self) -> RuntimeSettings:
        return RuntimeSettings(
            backend=self.hardware.backend,
            threads=self.settings.engine_threads or self.hardware.cpu_count,
            context_tokens=self.settings.context_tokens,
            gpu_layers=self.settings.gpu_layers,
            slots=self.settings.slots_per_model,
            batching=self.settings.batching,
            batch_exact=self.settings.batch_exact,
            prefix_cache_mb=self.settings.prefix_cache_mb,
            vllm_command=self.settings.vllm_command,
        )

    async def prefetch(self, resolved: ResolvedModel, *, pin: bool = False) -> None:
        """Loads every runtime the model needs for its capabilities, without serving a request.

        ``pin``: keep it loaded (a copy the balancer's scheduler placed): no on-demand load evicts it;
        only ``unload`` ends the pin. A load that fails leaves it unpinned.
        """
        if pin:
            self._pinned.add(resolved.model.id)
        try:
            for capability in resolved.model.capabilities:
                async with self.use(resolved, capability):
                    pass
        except BaseException:
            if pin:
                self._pinned.discard(resolved.model.id)
            raise

    async def unload(self, model_id: str) -> None:
        """Unloads a model and ends its pin: in-flight streams stop, waiting requests fail."""
        self._pinned.discard(model_id)
        self._failed.pop(model_id, None)
        entries = [e for e in self._entries.values() if e.model_id == model_id]
        for entry in entries:
            self._entries.pop((entry.model_id, entry.engine), None)
            self._leaving.add(entry)
            entry.closing = True
            for cancel in list(entry.cancels):
                cancel.set()
        for entry in entries:
            await entry.loaded.wait()
            if entry.active:
                await entry.idle.wait()
            await self._release_memory(entry)

    def _retire(self, entry: _Entry) -> None:
        """Takes ``entry`` out of use; requests on it finish, then its runtime is unloaded."""
        self._entries.pop((entry.model_id, entry.engine), None)
        self._leaving.add(entry)  # its memory counts until the unload is done
        entry.closing = True

        async def release() -> None:
            await entry.loaded.wait()
            if entry.active:
                await entry.idle.wait()
            await self._release_memory(entry)

        task = asyncio.get_running_loop().create_task(release())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """Unloads everything and stops the worker threads."""
        if self._closed:
            return
        for model_id in {e.model_id for e in self._entries.values()}:
            await self.unload(model_id)
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _release_memory(self, entry: _Entry) -> None:
        """Unloads ``entry``'s runtime (already out of ``_entries``) and wakes loads waiting for memory."""
        try:
            if entry.state is ModelState.READY and entry.runtime is not None:
                await self._run(entry.runtime.unload)
        except Exception as exc:  # the memory is gone with the runtime object either way
            log.warning("unload_failed", model_id=entry.model_id, error=repr(exc))
        finally:
            self._leaving.discard(entry)
        log.info("model_unloaded", model_id=entry.model_id, engine=entry.engine, memory_mb=entry.memory_mb)
        async with self._memory:
            self._memory.notify_all()

    def _evictable(self, keep: _Entry) -> _Entry | None:
        idle = [
            e
            for e in self._entries.values()
            if e is not keep
            and e.state is ModelState.READY
            and e.active == 0
            and e.waiting == 0
            and e.model_id not in self._pinned
        ]
        return min(idle, key=lambda e: e.last_used, default=None)

    async def _make_room(self, entry: _Entry) -> None:
        """Waits until ``entry`` fits the budget, evicting idle models, least recently used first."""
        if entry.memory_mb > self.budget_mb:
            raise LlmlbError(
                ErrorCode.INSUFFICIENT_STORAGE,
                f"model {entry.model_id!r} needs about {entry.memory_mb} MB; this node's memory budget is "
                f"{self.budget_mb} MB (XLLM_MEMORY_BUDGET_MB)",
            )
        kept = sum(e.memory_mb for e in self._holding() if e is not entry and e.model_id in self._pinned)
        if kept + entry.memory_mb > self.budget_mb:
            # Waiting would never end: pinned models leave only when the balancer unloads them.
            raise LlmlbError(
                ErrorCode.INSUFFICIENT_STORAGE,
                f"model {entry.model_id!r} needs about {entry.memory_mb} MB; {kept} MB of this node's "
                f"{self.budget_mb} MB memory budget hold models the balancer keeps loaded here",
            )
        async with self._memory:
            while self._over_budget(entry):
                victim = self._evictable(entry)
                if victim is None:
                    await self._memory.wait()  # every other model is busy: the next release wakes us
                    continue
                self._entries.pop((victim.model_id, victim.engine), None)
                self._leaving.add(victim)
                log.info(
                    "model_evicted",
                    model_id=victim.model_id,
                    for_model=entry.model_id,
                    memory_mb=victim.memory_mb,
                )
                self._memory.release()
                try:
                    await self._release_memory(victim)
                finally:
                    await self._memory.acquire()
            entry.admitted = True

    def _over_budget(self, entry: _Entry) -> bool:
        others = sum(e.memory_mb for e in self._holding() if e is not entry)
        return others + entry.memory_mb > self.budget_mb

    async def _load(self, entry: _Entry) -> None:
        # Child of the request whose use started the load (this task began in its context).
        span = tracing.start("load", attributes={"llmlb.model": entry.model_id, "llmlb.engine": entry.engine})
        try:
            entry.runtime = runtime = await self._run(entry.create)
            entry.memory_mb = runtime.memory_mb
            await self._make_room(entry)
            started = time.monotonic()
            self._loads += 1
            before = resident_mb()
            alone = self._loads == 1
            try:
                await self._run(runtime.load)
            finally:
                self._loads -= 1
            grew = resident_mb() - before
            if alone and self._loads == 0 and self.hardware.backend is Backend.CPU and grew > entry.memory_mb:
                # The estimate fell short of what loading took (measured alone, in this process's
                # RAM): what the node reports and budgets by from now on is what it measured.
                log.info(
                    "model_memory_measured", model_id=entry.model_id, estimate_mb=entry.memory_mb, mb=grew
                )
                entry.memory_mb = grew
        except Exception as exc:
            error = (
                exc if isinstance(exc, LlmlbError) else LlmlbError(ErrorCode.INTERNAL, f"load failed: {exc}")
            )
            entry.state, entry.error = ModelState.FAILED, error
            self._failed[entry.model_id] = error
            if self._entries.get((entry.model_id, entry.engine)) is entry:
                del self._entries[(entry.model_id, entry.engine)]
            log.warning(
                "model_load_failed", model_id=entry.model_id, engine=entry.engine, error=error.message
            )
            tracing.finish(span, error.code.value)
            async with self._memory:
                self._memory.notify_all()
        else:
            if span.is_recording():
                span.set_attribute("llmlb.memory_mb", entry.memory_mb)
            tracing.finish(span)
            entry.state = ModelState.READY
            self._failed.pop(entry.model_id, None)
            log.info(
                "model_ready",
                model_id=entry.model_id,
                engine=entry.engine,
                memory_mb=entry.memory_mb,
                seconds=round(time.monotonic() - started, 2),
            )
        finally:
            entry.loaded.set()

    def _entry_for(self, resolved: ResolvedModel, capability: Capability) -> _Entry:
        if self._closed:
            raise LlmlbError(ErrorCode.NO_CAPABLE_NODES, "this node is shutting down")
        model = resolved.model
        spec = self.engines.select(model, capability)
        key = (model.id, spec.engine)
        files = _signature(resolved.paths)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.files == files:
                return entry
            # The files under a loaded model changed (refetched after corruption, replaced on the share):
            # engines map their files, so the loaded copy may hold bad bytes. Load it again.
            log.warning("model_files_changed", model_id=model.id, engine=spec.engine)
            self._retire(entry)
        missing = [f.filename for f in model.files if f.filename not in resolved.paths]
        context = LoadContext(
            model=model,
            paths=dict(resolved.paths),
            settings=self._runtime_settings(),
            prefix_listener=self.prefix_listener,
        )
        entry = _Entry(
            model_id=model.id,
            engine=spec.engine,
            create=functools.partial(spec.create, context),
            slots=asyncio.Semaphore(self.settings.slots_per_model),
            files=files,
        )
        entry.idle.set()
        if missing:
            log.info("model_files_missing", model_id=model.id, files=missing)
        self._entries[key] = entry
        asyncio.get_running_loop().create_task(self._load(entry))
        return entry

    @asynccontextmanager
    async def use(self, resolved: ResolvedModel, capability: Capability) -> AsyncIterator[_Lease]:
        """Holds one slot of the model's runtime for ``capability``, loading it first if needed."""
        attributes = None
        if tracing.enabled():
            attributes = {"llmlb.model": resolved.model.id, "llmlb.capability": capability.value}
        with tracing.span("slot", attributes) as span:
            entry = await self._slot(resolved, capability)
            if span.is_recording():
                span.set_attribute("llmlb.engine", entry.engine)
        try:
            yield _Lease(entry)
        finally:
            entry.active -= 1
            entry.last_used = time.monotonic()
            entry.slots.release()
            if entry.active == 0:
                entry.idle.set()
                async with self._memory:
                    self._memory.notify_all()

    async def _slot(self, resolved: ResolvedModel, capability: Capability) -> _Entry:
        """Waits for the model's runtime to be loaded (starting the load if needed) and a slot free."""
        entry = self._entry_for(resolved, capability)
        limit = self.settings.slots_per_model + self.settings.queue_per_model
        if entry.active + entry.waiting >= limit:
            raise LlmlbError(
                ErrorCode.QUEUE_FULL,
                f"model {entry.model_id!r} has {entry.waiting} requests waiting; try again shortly",
                retry_after_s=1.0,
            )
        entry.waiting += 1
        try:
            await entry.loaded.wait()
            if entry.error is not None:
                raise entry.error
            await entry.slots.acquire()
        finally:
            entry.waiting -= 1
        if entry.closing:
            entry.slots.release()
            raise LlmlbError(
                ErrorCode.MODEL_NOT_FOUND, f"model {entry.model_id!r} was unloaded from this node"
            )
        entry.active += 1
        entry.idle.clear()
        entry.last_used = time.monotonic()
        return entry

    # -- requests --------------------------------------------------------------------------------

    async def unary(self, kind: Kind[R, T], resolved: ResolvedModel, request: R) -> T:
        """``kind``'s answer to ``request`` from the model's runtime, loaded first if needed.

        The call into the runtime runs on a worker thread. A caller that goes away sets the cancel flag,
        which the runtime sees at its next check, but the slot stays held until the thread is done:
        freed sooner, another request, an eviction or an unload could reach into a runtime still in use.
        """
        call = kind.unary
        assert call is not None, f"{kind.route} is answered by a stream"
        request.validate()
        serving = _serving(resolved, request)
        async with self.use(resolved, kind.capability) as lease:
            runtime = _need(lease, kind)
            cancel = threading.Event()
            lease.entry.cancels.add(cancel)
            loop = asyncio.get_running_loop()
            worker = loop.run_in_executor(self._executor, call, runtime, request, serving, cancel)
            try:
                with tracing.span("runtime", _runtime_attributes(lease)):
                    return await asyncio.shield(worker)
            except asyncio.CancelledError:
                cancel.set()
                await _outlast(worker)
                raise
            finally:
                lease.entry.cancels.discard(cancel)

    async def stream(self, kind: Kind[R, T], resolved: ResolvedModel, request: R) -> AsyncGenerator[T, None]:
        """``kind``'s answer to ``request`` item by item (a text stream's last chunk carries the finish
        reason and usage), from the model's runtime, loaded first if needed.

        The runtime's iterator runs on a worker thread and its items are yielded on the event loop. When
        the consumer stops early (closed, cancelled, the caller gone) the runtime sees the cancel flag at
        its next step; this returns only once the worker has stopped, so the slot is free.
        """
        produce = kind.stream
        assert produce is not None, f"{kind.route} is answered at once"
        request.validate()
        serving = _serving(resolved, request)
        async with self.use(resolved, kind.capability) as lease:
            runtime = _need(lease, kind)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
            cancel = threading.Event()
            lease.entry.cancels.add(cancel)

            def put(what: int, value: Any) -> None:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (what, value))
                except RuntimeError:  # the loop is gone: nobody is listening any more
                    cancel.set()

            def work() -> None:
                try:  # the runtime sees the flag and ends with its final item
                    for item in produce(runtime, request, serving, cancel):
                        put(_ITEM, item)
                except BaseException as exc:
                    put(_ERROR, exc)
                finally:
                    put(_END, None)

            worker = loop.run_in_executor(self._executor, work)
            # Ended below, not held current: this generator yields to its consumer while the runtime runs.
            span = tracing.start("runtime", attributes=_runtime_attributes(lease))
            outcome = ErrorCode.CANCELLED.value  # unless the runtime runs to its end or fails
            try:
                while True:
                    what, value = await queue.get()
                    if what == _END:
                        break
                    if what == _ERROR:
                        outcome = tracing.outcome_of(value)
                        raise value
                    yield cast(T, value)
                outcome = tracing.OK
            finally:
                tracing.finish(span, outcome)
                cancel.set()
                lease.entry.cancels.discard(cancel)
                if await _outlast(worker):  # the slot is held until the worker has let go of the runtime
                    raise asyncio.CancelledError


def _serving(resolved: ResolvedModel, request: InferenceRequest) -> Serving:
    request_id = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
    return Serving(resolved.model.id, request_id, int(time.time()))


def _need(lease: _Lease, kind: Kind[Any, Any]) -> Any:
    """The leased runtime, if it serves ``kind`` (a model's engine may lack one of its capabilities)."""
    if not isinstance(lease.runtime, kind.runtime):
        raise LlmlbError(
            ErrorCode.NO_CAPABLE_NODES,
            f"{lease.entry.model_id!r}: runtime cannot serve {kind.capability.value}",
        )
    return lease.runtime


def _runtime_attributes(lease: _Lease) -> dict[str, str | int | float | bool]:
    if not tracing.enabled():
        return {}
    return {"llmlb.model": lease.entry.model_id, "llmlb.engine": lease.entry.engine}


def resident_mb() -> int:
    """This process's resident memory in MB (Linux ``/proc/self/statm``); 0 when unknown."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)


async def _outlast(worker: asyncio.Future[Any]) -> bool:
    """Waits until a worker thread's call is over, whatever cancels arrive meanwhile; True if any did."""
    interrupted = False
    while not worker.done():
        try:
            await asyncio.wait([worker])
        except asyncio.CancelledError:
            interrupted = True
    if not worker.cancelled():
        worker.exception()  # read here: the caller has gone and nobody else will
    return interrupted
