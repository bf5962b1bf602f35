"""The live model catalogue, transport-neutral: the gRPC servicers and the HTTP shim both call it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath

import structlog

from balancer.changes import ChangeBus, ModelChanged, Resync
from balancer.origin import Origin, PinnedRepo, RemoteFile
from balancer.store import Store, TooLong
from common.errors import ErrorCode, LlmlbError
from common.formats import backends_for, capabilities_for, check_filename, classify, is_manifest_file
from common.model_id import derive_model_id, normalize_model_id
from common.types import Backend, Capability, FileFormat, ManifestFile, Model, ModelSource

log = structlog.get_logger(__name__)

_RUNNABLE = {FileFormat.GGUF, FileFormat.SAFETENSORS, FileFormat.METAL, FileFormat.ONNX, FileFormat.WHISPER}
MAX_REPO_ID_LENGTH = 200


@dataclass(slots=True)
class RegisterRequest:
    """What a caller asks to register; empty fields take the documented defaults."""

    repo_id: str
    filename: str = ""
    revision: str = ""
    model_id: str = ""
    origin: str = ""
    name: str = ""
    capabilities: list[Capability] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    required_vram_mb: int = 0
    chat_template: str = ""


class Catalog:
    """Registers, lists and deletes models; pins every registration to an origin commit.

    Reads are served from memory. Every write of this process goes through here, so its copy is
    exact; writes by other replicas of the same store arrive on the change bus (``ModelChanged``,
    and the periodic ``Resync``). The store stays the truth across restarts.
    """

    def __init__(self, store: Store, origin: Origin, bus: ChangeBus | None = None) -> None:
        self._store = store
        self._origin = origin
        self._bus = bus if bus is not None else ChangeBus()  # alone: nothing travels
        self._models: dict[str, Model] = {}
        self._gone: list[Callable[[str], None]] = []
        self._bus.subscribe(ModelChanged, self._model_changed)
        self._bus.subscribe(Resync, self._resync)

    def on_gone(self, listener: Callable[[str], None]) -> None:
        """Calls ``listener`` with each model id another replica deleted, once this copy drops it."""
        self._gone.append(listener)

    async def load(self) -> None:
        """Reads every model from the store: at start, after seeding, and to resync with other replicas."""
        self._models = {m.id: m for m in await self._store.list_models()}

    async def refresh(self, model_id: str) -> bool:
        """Re-reads one model another replica registered or deleted; False when it is gone."""
        model = await self._store.get_model(model_id)
        if model is None:
            self._models.pop(model_id, None)
            return False
        self._models[model_id] = model
        return True

    async def _model_changed(self, change: ModelChanged) -> None:
        if not await self.refresh(change.model_id):
            for listener in self._gone:
                listener(change.model_id)

    async def _resync(self, _: Resync) -> None:
        before = set(self._models)
        await self.load()
        for model_id in before - set(self._models):
            for listener in self._gone:
                listener(model_id)

    async def register(self, req: RegisterRequest) -> Model:
        repo_id = _check_repo_id(req.repo_id)
        filename = check_filename(req.filename) if req.filename else ""
        # Validate the id and the origin before any network traffic.
        model_id = normalize_model_id(req.model_id) if req.model_id else derive_model_id(repo_id, filename)
        origin = self._origin.check_allowed(req.origin or self._origin.default)
        pinned = await self._origin.pin(origin, repo_id, req.revision)
        chosen = _select_files(pinned, filename)
        pinned = await self._origin.hash_missing(pinned, {f.filename for f in chosen})
        by_name = {f.filename: f for f in pinned.files}
        files = []
        for f in chosen:
            fmt = classify(f.filename)
            remote = by_name[f.filename]
            files.append(ManifestFile(f.filename, fmt, remote.size_bytes, remote.sha256, backends_for(fmt)))
        formats = {f.format for f in files}
        model = Model(
            id=model_id,
            name=req.name or model_id,
            source=ModelSource.HF,
            repo_id=repo_id,
            revision=pinned.revision,
            origin=origin,
            files=files,
            capabilities=list(dict.fromkeys(req.capabilities)) or capabilities_for(formats),
            tags=list(dict.fromkeys(req.tags)),
            required_vram_mb=req.required_vram_mb or _estimate_vram_mb(files),
            chat_template=req.chat_template,
        )
        existing = self._models.get(model_id)
        if existing is not None and _same_registration(existing, model):
            return existing  # idempotent: nothing changed at the origin or in the request
        try:
            stored = await self._store.upsert_model(model)
        except TooLong as exc:  # e.g. a display name longer than the store keeps
            raise LlmlbError(ErrorCode.INVALID_REQUEST, f"model {model_id!r}: {exc}") from None
        self._models[model_id] = stored
        await self._bus.publish(ModelChanged(model_id))
        log.info(
            "model.registered",
            model_id=model_id,
            repo_id=repo_id,
            revision=pinned.revision,
            files=len(files),
            bytes=stored.total_bytes,
        )
        return stored

    async def register_local(self, node_id: str, models: Sequence[Model]) -> list[str]:
        """Lists the models a node found placed by hand (source ``local``); returns the ids changed.

        A catalogue or registered model of the same id is kept as it is (pinned): the node's folder is
        not used for it, and the clash is logged. A local model another node reported already is
        replaced by this report when its files differ (the last report wins). Models a node stops
        reporting stay listed until deleted.
        """
        changed: list[str] = []
        for reported in models:
            try:
                model = _local_model(reported)
            except LlmlbError as exc:
                log.warning(
                    "local_model.refused", node_id=node_id, model_id=reported.id[:80], error=exc.message
                )
                continue
            existing = self._models.get(model.id)
            if existing is not None and existing.source is not ModelSource.LOCAL:
                log.warning(
                    "local_model.id_clash",
                    node_id=node_id,
                    model_id=model.id,
                    kept=existing.source.value,
                    reason="a catalogue or registered model has this id; the hand-placed folder is not used",
                )
                continue
            if existing is not None and (existing.files, existing.capabilities) == (
                model.files,
                model.capabilities,
            ):
                continue
            try:
                stored = await self._store.upsert_model(model)
            except TooLong as exc:
                log.warning("local_model.refused", node_id=node_id, model_id=model.id, error=str(exc))
                continue
            self._models[model.id] = stored
            await self._bus.publish(ModelChanged(model.id))
            log.info("local_model.listed", node_id=node_id, model_id=model.id, files=len(model.files))
            changed.append(model.id)
        return changed

    async def get(self, model_id: str) -> Model:
        normal = normalize_model_id(model_id)
        model = self._models.get(normal)
        if model is None:
            raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"model {normal!r} not found")
        return model

    def knows(self, model_id: str) -> bool:
        """Whether ``model_id`` (in normal form) is in the catalogue now; no store read."""
        return model_id in self._models

    async def list_models(self) -> list[Model]:
        return [self._models[k] for k in sorted(self._models)]

    async def delete(self, model_id: str) -> int:
        """Drops the model and queues a durable delete for every known node; returns how many."""
        normal = normalize_model_id(model_id)
        nodes = await self._store.list_nodes()
        if not await self._store.delete_model(normal):
            raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"model {normal!r} not found")
        self._models.pop(normal, None)
        await self._bus.publish(ModelChanged(normal))
        log.info("model.deleted", model_id=normal, nodes_notified=len(nodes))
        return len(nodes)

    async def seed(self, catalog: list[Model]) -> list[str]:
        """Seeds the catalogue; an entry whose files lack a sha256 is pinned at its origin first.

        Such an entry's sizes are only hints (published sizes are often rounded): the origin's exact
        size and sha256 replace them, and the commit is pinned. An origin that cannot be reached
        leaves the entry as written; the next start pins it then.
        """
        stored = {m.id: m for m in await self._store.list_models()}
        ready: list[Model] = []
        repinned: list[Model] = []
        for model in catalog:
            have = stored.get(model.id)
            if not _needs_pin(model) or (have is not None and not _needs_pin(have)):
                ready.append(model)
                continue
            try:
                pinned = await self._pin_entry(model)
            except LlmlbError as exc:
                log.warning("catalog.pin_failed", model_id=model.id, repo_id=model.repo_id, error=exc.message)
                ready.append(model)
                continue
            ready.append(pinned)
            if have is not None and have.from_catalog:
                repinned.append(pinned)  # seeded unpinned by an earlier start
        inserted = await self._store.seed_catalog(ready)
        for model in repinned:
            await self._store.upsert_model(model)
            await self._bus.publish(ModelChanged(model.id))
        if inserted:
            log.info("catalog.seeded", models=inserted)
        await self.load()
        return inserted

    async def _pin_entry(self, model: Model) -> Model:
        origin = self._origin.check_allowed(model.origin or self._origin.default)
        pinned = await self._origin.pin(origin, model.repo_id, model.revision)
        pinned = await self._origin.hash_missing(pinned, {f.filename for f in model.files})
        by_name = {f.filename: f for f in pinned.files}
        files = []
        for f in model.files:
            remote = by_name.get(f.filename)
            if remote is None:
                where = f"{model.repo_id}@{pinned.revision[:12]}"
                raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"file {f.filename!r} not found in {where}")
            if f.sha256:
                files.append(f)  # the catalogue's own digest is the truth
                continue
            if remote.size_bytes != f.size_bytes:
                log.info(
                    "catalog.size_pinned",
                    model_id=model.id,
                    filename=f.filename,
                    published_bytes=f.size_bytes,
                    bytes=remote.size_bytes,
                    difference=remote.size_bytes - f.size_bytes,
                )
            files.append(replace(f, size_bytes=remote.size_bytes, sha256=remote.sha256))
        log.info("catalog.pinned", model_id=model.id, repo_id=model.repo_id, revision=pinned.revision)
        return replace(model, origin=origin, revision=pinned.revision, files=files)


def _check_repo_id(repo_id: str) -> str:
    repo_id = repo_id.strip()
    if not repo_id:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, "repo_id is required")
    parts = repo_id.split("/")
    if (
        len(repo_id) > MAX_REPO_ID_LENGTH
        or len(parts) > 2
        or any(not p or p in (".", "..") for p in parts)
        or any(not (c.isalnum() or c in "-_.") for p in parts for c in p)
    ):
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST,
            f"repo_id {repo_id[:80]!r} is not a repository id like 'org/name'",
        )
    return repo_id


def _select_files(pinned: PinnedRepo, filename: str) -> list[RemoteFile]:
    """The repository files a model needs: the named file (with its sidecars) or every model file."""
    where = f"{pinned.repo_id}@{pinned.revision[:12]}"
    if filename:
        by_name = {f.filename: f for f in pinned.files}
        if filename not in by_name:
            raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"file {filename!r} not found in {where}")
        # Sidecars such as voice.onnx.json travel with voice.onnx.
        sidecars = [
            f for f in pinned.files if f.filename != filename and f.filename.startswith(filename + ".")
        ]
        if classify(filename) is not FileFormat.GGUF:
            folder = str(PurePosixPath(filename).parent)
            sidecars += [
                f
                for f in pinned.files
                if f not in sidecars
                and str(PurePosixPath(f.filename).parent) == folder
                and classify(f.filename) is FileFormat.CONFIG
                and is_manifest_file(f.filename)
            ]
        return [by_name[filename], *sorted(sidecars, key=lambda f: f.filename)]
    chosen = [f for f in pinned.files if is_manifest_file(f.filename)]
    ggufs = [f.filename for f in chosen if classify(f.filename) is FileFormat.GGUF]
    if len(ggufs) > 1:
        shown = ", ".join(sorted(ggufs)[:10]) + (" …" if len(ggufs) > 10 else "")
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST,
            f"{where} holds {len(ggufs)} GGUF files; name one with filename: {shown}",
        )
    if not any(classify(f.filename) in _RUNNABLE for f in chosen):
        raise LlmlbError(ErrorCode.INVALID_REQUEST, f"{where} holds no model file a runtime can load")
    return sorted(chosen, key=lambda f: f.filename)


def _local_model(reported: Model) -> Model:
    """A node's report of a model placed by hand, checked: a good id and file names, source local."""
    model_id = normalize_model_id(reported.id)
    files = [
        ManifestFile(check_filename(f.filename), classify(f.filename), max(0, f.size_bytes), f.sha256.lower())
        for f in reported.files
    ]
    for f in files:
        if len(f.sha256) != 64 or any(c not in "0123456789abcdef" for c in f.sha256):
            raise LlmlbError(ErrorCode.INVALID_REQUEST, f"file {f.filename!r} has no sha256")
    files = [replace(f, backends=backends_for(f.format)) for f in files]
    if not any(f.format in _RUNNABLE for f in files):
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST, f"model {model_id!r} holds no model file a runtime can load"
        )
    return Model(
        id=model_id,
        name=model_id,
        source=ModelSource.LOCAL,
        repo_id="",
        revision="",
        origin="",
        files=sorted(files, key=lambda f: f.filename),
        capabilities=capabilities_for({f.format for f in files}),
        tags=["local"],
    )


def _needs_pin(model: Model) -> bool:
    """A catalogue entry with a file lacking its sha256 (its size is a hint) and a repo to pin it at."""
    return model.source is ModelSource.HF and bool(model.repo_id) and any(not f.sha256 for f in model.files)


def _estimate_vram_mb(files: list[ManifestFile]) -> int:
    # Weights needed on a CUDA node, plus ~20 % for context and activations.
    weights = sum(f.size_bytes for f in files if f.format in _RUNNABLE and f.needed_by(Backend.CUDA))
    return int(weights * 1.2 / (1024 * 1024)) if weights else 0


def _same_registration(a: Model, b: Model) -> bool:
    return (
        a.repo_id == b.repo_id
        and a.revision == b.revision
        and a.origin == b.origin
        and a.files == b.files
        and a.name == b.name
        and a.capabilities == b.capabilities
        and a.tags == b.tags
        and a.required_vram_mb == b.required_vram_mb
        and a.chat_template == b.chat_template
        and not a.from_catalog
    )
