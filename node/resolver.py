"""Finding a model's files for this node: local dir, then the shared dir, then a download.

Each file the node's backend needs is looked for in order:

1. ``<models_dir>/<model-id>/<file>``, valid when non-empty and matching the manifest's size and
   sha256;
2. ``<shared_dir>/<model-id>/<file>`` (an NFS mount), used in place and never copied; it is looked
   at again on every resolution, so a file changed on the share is seen by the next request, and a
   share that does not answer within ``shared_dir_timeout_s`` is skipped;
3. a download: from a peer node that holds it, then from the origin (or, with ``--download-via
   balancer``, through the balancer's proxy).

An unknown model fails with ``model_not_found`` as soon as the balancer says so; a bad id fails with
``invalid_model_id`` before any file is touched.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from common.config import NodeConfig
from common.errors import ErrorCode, LlmlbError
from common.formats import check_filename
from common.model_id import normalize_model_id
from common.types import Backend, ManifestFile, Model, ModelSource, ModelState
from node.blob_sources import BlobSource
from node.downloader import Downloader, Progress
from node.local_models import LocalModel, LocalModels
from node.model_book import ModelBook
from node.storage import Storage

log = structlog.get_logger(__name__)

# After a shared dir fails to answer, it is not asked again for this long.
SHARED_DIR_RETRY_S = 30.0
# A manifest the balancer gave is reused this long, saving every request a round trip; a delete
# command drops it at once.
MANIFEST_TTL_S = 2.0


class ManifestProvider(Protocol):
    """The balancer, as the resolver sees it: manifests, and where else a model's bytes can come from."""

    async def get_model(self, model_id: str) -> Model: ...

    async def peer_sources(self, model_id: str) -> list[BlobSource]: ...

    def proxy_source(self) -> BlobSource: ...

    def swarm_name(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model this node can run: its manifest and, per needed file, where that file is on disk."""

    model: Model
    paths: Mapping[str, Path]  # manifest filename -> absolute path (models dir or shared dir)
    sources: Mapping[str, str] = field(default_factory=dict)  # filename -> local | shared | <download source>

    @property
    def shared(self) -> bool:
        return any(s == "shared" for s in self.sources.values())


def needed_files(model: Model, backend: Backend) -> list[ManifestFile]:
    """The files a node running ``backend`` needs: no ``.metal.bin`` on CUDA or CPU, for example."""
    return [f for f in model.files if f.needed_by(backend)]


class Resolver:
    def __init__(
        self,
        config: NodeConfig,
        backend: Backend,
        storage: Storage,
        downloader: Downloader,
        states: ModelBook,
        manifests: ManifestProvider,
        origin: BlobSource,
        local: LocalModels | None = None,
    ) -> None:
        self._config = config
        self._local = local  # models placed by hand: resolved from their folders, never fetched
        self._local_ids: set[str] = set()
        self._backend = backend
        self._storage = storage
        self._downloader = downloader
        self._states = states
        self._manifests = manifests
        self._origin = origin
        self._shared_down_until = 0.0
        self._file_progress: dict[str, dict[str, int]] = {}  # model_id -> filename -> bytes held
        self._manifests_seen: dict[str, tuple[float, Model]] = {}  # model_id -> (fetched at, manifest)
        self._deletes: dict[str, int] = {}  # model_id -> deletes so far: a resolve spanning one stops

    def forget(self, model_id: str) -> None:
        """The balancer deleted ``model_id``: drop its manifest, and stop resolutions under way."""
        self._manifests_seen.pop(model_id, None)
        self._deletes[model_id] = self._deletes.get(model_id, 0) + 1

    def needed_files(self, model: Model) -> list[ManifestFile]:
        return needed_files(model, self._backend)

    async def manifest(self, model_id: str) -> Model:
        """The model's manifest from the balancer; the saved copy when the balancer cannot be reached."""
        model_id = normalize_model_id(model_id)
        seen = self._manifests_seen.get(model_id)
        if seen is not None and time.monotonic() - seen[0] < MANIFEST_TTL_S:
            return seen[1]
        try:
            model = await self._manifests.get_model(model_id)
            self._manifests_seen[model_id] = (time.monotonic(), model)
            return model
        except LlmlbError as exc:
            if exc.code in (ErrorCode.MODEL_NOT_FOUND, ErrorCode.INVALID_MODEL_ID):
                raise
            if seen is not None:  # past its TTL, but still the balancer's last word (a delete drops it)
                log.info("manifest.last_seen", model_id=model_id, reason=exc.message)
                return seen[1]
            saved = self._storage.load_manifest(model_id)
            if saved is None:
                # Not "model not found": the model may well exist, and another node may serve it now.
                raise LlmlbError(
                    ErrorCode.UNAVAILABLE,
                    f"the manifest of {model_id!r} cannot be read: this node has no copy and the balancer "
                    f"cannot be asked ({exc.message})",
                ) from None
            log.info("manifest.saved_copy", model_id=model_id, reason=exc.message)
            return saved

    async def resolve(self, model_id: str) -> ResolvedModel:
        """Makes every file the model needs available on this node and says where each one is."""
        try:
            model = await self.manifest(model_id)
        except LlmlbError as exc:
            # Placed by hand a moment ago (the balancer has not heard of it yet), or the balancer
            # cannot be asked: the folder on this node is enough.
            if exc.code in (ErrorCode.MODEL_NOT_FOUND, ErrorCode.UNAVAILABLE) and self._local is not None:
                local = await self._local.refresh(normalize_model_id(model_id))
                if local is not None:
                    return self._resolved_local(local)
            raise
        if model.source is ModelSource.LOCAL and self._local is not None:
            # Its folder is the truth on this node: looked at again, so a changed file is used now.
            local = await self._local.refresh(model.id)
            if local is None:
                raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"model {model.id!r} is not on this node")
            return self._resolved_local(local)
        deletes = self._deletes.get(model.id, 0)
        needed = self.needed_files(model)
        paths: dict[str, Path] = {}
        sources: dict[str, str] = {}
        missing: list[ManifestFile] = []
        for file in needed:
            if await self._storage.is_valid(model.id, file):
                paths[file.filename] = self._storage.file_path(model.id, file.filename)
                sources[file.filename] = "local"
                continue
            shared = await self._on_shared_dir(model, file)
            if shared is not None:
                paths[file.filename] = shared
                sources[file.filename] = "shared"
                continue
            missing.append(file)
        if missing:
            await self._download(model, needed, missing, paths, sources, deletes)
        elif sources and all(s == "local" for s in sources.values()):
            self._storage.save_manifest(model)  # a copy placed by hand becomes a known model
        total = sum(f.size_bytes for f in needed)
        if self._states.get(model.id).state not in (ModelState.LOADING, ModelState.READY):
            self._states.set(model.id, ModelState.PRESENT, downloaded=total, total=total)
        return ResolvedModel(model, paths, sources)

    def local_models_changed(self, models: list[Model]) -> None:
        """Models placed by hand are on disk here: the balancer hears them present (gone: absent)."""
        for model in models:
            if self._states.get(model.id).state not in (ModelState.LOADING, ModelState.READY):
                total = sum(f.size_bytes for f in self.needed_files(model))
                self._states.set(model.id, ModelState.PRESENT, downloaded=total, total=total)
        ids = {m.id for m in models}
        for gone in self._local_ids - ids:
            self._states.remove(gone)
        self._local_ids = ids

    def _resolved_local(self, local: LocalModel) -> ResolvedModel:
        model = local.model
        needed = self.needed_files(model)
        paths = {f.filename: local.folder / f.filename for f in needed}
        where = "local" if local.kind == "models" else "shared"
        total = sum(f.size_bytes for f in needed)
        if self._states.get(model.id).state not in (ModelState.LOADING, ModelState.READY):
            self._states.set(model.id, ModelState.PRESENT, downloaded=total, total=total)
        return ResolvedModel(model, paths, dict.fromkeys(paths, where))

    async def _on_shared_dir(self, model: Model, file: ManifestFile) -> Path | None:
        shared_dir = self._config.shared_dir
        if shared_dir is None or time.monotonic() < self._shared_down_until:
            return None
        path = shared_dir / model.id / file.filename
        try:
            # A hung NFS mount blocks stat() in the kernel: ask from a thread and stop waiting.
            await asyncio.wait_for(asyncio.to_thread(os.stat, path), self._config.shared_dir_timeout_s)
        except TimeoutError:
            self._shared_down_until = time.monotonic() + SHARED_DIR_RETRY_S
            log.warning("shared_dir.unresponsive", path=str(shared_dir), retry_in_s=SHARED_DIR_RETRY_S)
            return None
        except OSError:
            return None
        if await self._storage.verifier.matches(
            path, file, self._storage.shared_marker_path(model.id, file.filename)
        ):
            return path
        log.warning("shared_dir.mismatch", model_id=model.id, filename=file.filename, path=str(path))
        return None

    async def _download(
        self,
        model: Model,
        needed: list[ManifestFile],
        missing: list[ManifestFile],
        paths: dict[str, Path],
        sources: dict[str, str],
        deletes: int,
    ) -> None:
        total = sum(f.size_bytes for f in needed)
        held = {f.filename: f.size_bytes for f in needed if f.filename in paths}
        held.update({f.filename: self._storage.partial_bytes(model.id, f.filename) for f in missing})
        self._file_progress[model.id] = held
        try:
            # Before the model is reported downloading: a model that cannot fit never looks like it might.
            self._downloader.check_room(model.id, missing)
            self._still_wanted(model.id, deletes)
            self._states.progress(model.id, sum(held.values()), total)
            self._storage.save_manifest(model)  # so a restarted node can resume without asking anyone
            blob_sources = await self._sources(model)

            async def refresh() -> list[BlobSource]:  # the swarm, as the balancer sees it now
                return await self._manifests.peer_sources(model.id) if self._config.peer_fetch else []

            for file in missing:
                self._still_wanted(model.id, deletes)
                paths[file.filename] = await self._downloader.fetch(
                    model, file, blob_sources, refresh=refresh, me=self._manifests.swarm_name()
                )
                sources[file.filename] = "download"
            self._still_wanted(model.id, deletes)
        except (LlmlbError, asyncio.CancelledError) as exc:
            if self._deletes.get(model.id, 0) != deletes and not _cancelling():
                # Deleted meanwhile (the delete also cancels transfers under way): take back what this
                # resolution wrote, and tell the caller the model is gone.
                await self._storage.delete(model.id)
                self._states.remove(model.id)
                raise _deleted(model.id) from None
            if isinstance(exc, LlmlbError):
                self._states.set(model.id, ModelState.FAILED, total=total, error=exc.message)
            raise
        finally:
            self._file_progress.pop(model.id, None)

    def _still_wanted(self, model_id: str, deletes: int) -> None:
        """Raises ``model_not_found`` once a delete arrived after this resolution began.

        Checked before anything is written, before each file and after the last, so a delete racing a
        resolution never leaves a copy behind: the delete cancels transfers already running, and this
        stops the ones not yet started.
        """
        if self._deletes.get(model_id, 0) != deletes:
            raise _deleted(model_id)

    async def _sources(self, model: Model) -> list[BlobSource]:
        found: list[BlobSource] = []
        if self._config.peer_fetch:
            try:
                found.extend(await self._manifests.peer_sources(model.id))
            except LlmlbError as exc:
                log.info("peers.unavailable", model_id=model.id, error=exc.message)
        found.append(
            self._manifests.proxy_source() if self._config.download_via == "balancer" else self._origin
        )
        return found

    def on_progress(self, progress: Progress) -> None:
        """Downloader callback: per-file bytes become the model's downloaded bytes."""
        held = self._file_progress.get(progress.model_id)
        if held is None:
            return
        held[progress.filename] = progress.done
        self._states.progress(progress.model_id, sum(held.values()), 0)

    async def survey(self) -> None:
        """Reports the models the models dir already holds: present when whole, else how far along."""
        for model in self._storage.known_models():
            needed = self.needed_files(model)
            total = sum(f.size_bytes for f in needed)
            held, whole = 0, True
            for file in needed:
                if await self._storage.is_valid(model.id, file):
                    held += file.size_bytes
                else:
                    whole = False
                    held += self._storage.partial_bytes(model.id, file.filename)
            if whole:
                self._states.set(model.id, ModelState.PRESENT, downloaded=total, total=total)
            elif held:
                self._states.set(model.id, ModelState.DOWNLOADING, downloaded=held, total=total)

    async def locate(self, model_id: str, filename: str) -> tuple[ManifestFile, Path]:
        """Where this node holds one file of a model, without downloading: for peers reading it."""
        model_id = normalize_model_id(model_id)
        check_filename(filename)
        saved = self._storage.load_manifest(model_id)
        model = saved if saved is not None else await self.manifest(model_id)
        file = next((f for f in model.files if f.filename == filename), None)
        if file is None:
            raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"{filename!r} is not a file of {model_id!r}")
        if await self._storage.is_valid(model_id, file):
            return file, self._storage.file_path(model_id, filename)
        shared = await self._on_shared_dir(model, file)
        if shared is not None:
            return file, shared
        raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"this node does not hold {model_id}/{filename}")


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (its caller left), not just a wait inside it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _deleted(model_id: str) -> LlmlbError:
    return LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"model {model_id!r} was deleted while being fetched")
