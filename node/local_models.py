"""Models placed by hand: folders in the models dir or the shared dir that no fetch of this node made.

``mkdir -p ~/.llmlb/models/llama-3.2-1b && cp X.gguf ~/.llmlb/models/llama-3.2-1b/model.gguf`` is
enough: a folder directly holding a weight file (``.gguf``, ``.safetensors``, ``.onnx``, whisper's
``model.bin``) is a model whose id is the folder's path under the dir, checked by the rules of every
model id (``common.model_id``); a folder whose name breaks them, or is not in its normal (lower-case)
form, is logged once and skipped. Its files (weights, config and tokenizer files, not documentation)
are hashed once per version (size, mtime, inode; remembered in markers under
``<models_dir>/.llmlb/local-verified/``, so a restart does not hash them again), off the event loop.

Folders the node manages itself are never mistaken for these: a model it fetched carries
``.llmlb/manifest.json`` naming a source other than ``local``, downloads in progress hold only
``.partial`` files, and dot-folders (``.llmlb``, ``.locks``) are never looked into. The models dir wins
over the shared dir for one id. A folder named after a model the balancer holds from the catalogue (or
a registration) is that model's copy, left to the usual resolution against its pinned manifest: it is
neither hashed nor reported. The dirs are scanned at start and every ``local_scan_interval_s``;
the resolver rescans one model's folder before each use, so a file changed on the share is used (hashed
again, and the model reloaded) by the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from common.errors import LlmlbError
from common.formats import backends_for, capabilities_for, classify, is_manifest_file
from common.model_id import normalize_model_id
from common.types import FileFormat, ManifestFile, Model, ModelSource
from node.storage import META_DIR, PARTIAL_SUFFIX, Storage

log = structlog.get_logger(__name__)

WEIGHTS = {FileFormat.GGUF, FileFormat.SAFETENSORS, FileFormat.METAL, FileFormat.ONNX, FileFormat.WHISPER}
MAX_DEPTH = 4  # ids nest like paths (org/name); deeper folders are not looked into
SETTLE_S = 2.0  # a file written this recently may still be being copied: looked at on the next scan


@dataclass(frozen=True, slots=True)
class LocalModel:
    """One model folder placed by hand, with its files as last hashed."""

    model: Model
    folder: Path
    kind: str  # "models" (this node's models dir) or "shared"


@dataclass(frozen=True, slots=True)
class _Folder:
    model_id: str
    path: Path
    kind: str
    files: tuple[str, ...]  # '/'-paths under the folder
    settled: bool


class LocalModels:
    """The models placed by hand on this node; listeners hear the whole list whenever it changes."""

    def __init__(
        self,
        storage: Storage,
        shared_dir: Path | None,
        interval_s: float,
        pinned: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self._storage = storage
        # Whether the balancer holds the id as a catalogue or registered model: such a folder is a
        # copy of that model (a shared dir laid out for the catalogue), neither hashed nor reported.
        self._pinned = pinned
        self._catalogue_ids: set[str] = set()
        self._roots = [("models", storage.root)] + ([("shared", shared_dir)] if shared_dir else [])
        self._interval_s = interval_s
        self._found: dict[str, LocalModel] = {}
        self._listeners: list[Callable[[list[Model]], None]] = []
        self._told_bad: set[Path] = set()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def subscribe(self, listener: Callable[[list[Model]], None]) -> None:
        self._listeners.append(listener)

    def models(self) -> list[Model]:
        return [self._found[k].model for k in sorted(self._found)]

    def get(self, model_id: str) -> LocalModel | None:
        return self._found.get(model_id)

    def start(self) -> None:
        """Scans now and then every ``interval_s`` (0: only now), in the background."""
        self._task = asyncio.create_task(self._every(), name="local-models")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _every(self) -> None:
        while True:
            try:
                await self.scan()
            except Exception as exc:  # a scan that fails is tried again at the next interval
                log.warning("local_models.scan_failed", error=repr(exc))
            if self._interval_s <= 0:
                return
            await asyncio.sleep(self._interval_s)

    async def scan(self) -> bool:
        """Looks at both dirs again; True when the list changed (the listeners were told)."""
        loop = asyncio.get_running_loop()
        folders = await loop.run_in_executor(self._storage.io_threads, self._walk_all)
        async with self._lock:
            found: dict[str, LocalModel] = {}
            for folder in folders:
                if folder.model_id in found:
                    continue  # the models dir wins over the shared dir
                entry = await self._entry(folder)
                if entry is not None:
                    found[folder.model_id] = entry
            return self._replace(found)

    async def refresh(self, model_id: str) -> LocalModel | None:
        """Rescans one model's folder now (its files hashed again if they changed); None when gone."""
        loop = asyncio.get_running_loop()
        folder = await loop.run_in_executor(self._storage.io_threads, self._walk_one, model_id)
        async with self._lock:
            found = dict(self._found)
            entry = await self._entry(folder) if folder is not None else None
            if entry is None:
                found.pop(model_id, None)
            else:
                found[model_id] = entry
            self._replace(found)
            return found.get(model_id)

    async def _entry(self, folder: _Folder) -> LocalModel | None:
        old = self._found.get(folder.model_id)
        if not folder.settled:
            return old  # being copied: keep what was there, look again next time
        if old is None and await self._is_catalogue_id(folder.model_id):
            return None
        files = []
        for name in folder.files:
            path = folder.path / name
            marker = self._storage.local_marker_path(folder.kind, folder.model_id, name)
            try:
                size, sha256 = await self._storage.verifier.digest(path, marker)
            except (OSError, LlmlbError) as exc:
                log.warning(
                    "local_model.unreadable", model_id=folder.model_id, path=str(path), error=repr(exc)
                )
                return old
            fmt = classify(name)
            files.append(ManifestFile(name, fmt, size, sha256, backends_for(fmt)))
        model = Model(
            id=folder.model_id,
            name=folder.model_id,
            source=ModelSource.LOCAL,
            repo_id="",
            revision="",
            origin="",
            files=files,
            capabilities=capabilities_for({f.format for f in files}),
        )
        return LocalModel(model, folder.path, folder.kind)

    async def _is_catalogue_id(self, model_id: str) -> bool:
        if model_id in self._catalogue_ids:
            return True
        if self._pinned is None or not await self._pinned(model_id):
            return False
        self._catalogue_ids.add(model_id)
        log.info(
            "local_model.catalogue_id", model_id=model_id, reason="the catalogue's model is used, pinned"
        )
        return True

    def _replace(self, found: dict[str, LocalModel]) -> bool:
        before = {k: (v.model.files, v.folder) for k, v in self._found.items()}
        after = {k: (v.model.files, v.folder) for k, v in found.items()}
        self._found = found
        if before == after:
            return False
        for model_id in sorted(after.keys() - before.keys()):
            log.info("local_model.found", model_id=model_id, path=str(found[model_id].folder))
        for model_id in sorted(before.keys() - after.keys()):
            log.info("local_model.gone", model_id=model_id)
        for model_id in sorted(before.keys() & after.keys()):
            if before[model_id] != after[model_id]:
                log.info("local_model.changed", model_id=model_id, path=str(found[model_id].folder))
        models = self.models()
        for listener in self._listeners:
            listener(models)
        return True

    # -- the walk, in an I/O thread ---------------------------------------------------------------

    def _walk_all(self) -> list[_Folder]:
        out: list[_Folder] = []
        for kind, root in self._roots:
            if root.is_dir():
                self._walk(kind, root, root, MAX_DEPTH, out)
        return out

    def _walk_one(self, model_id: str) -> _Folder | None:
        for kind, root in self._roots:
            folder = self._folder(kind, root, root / model_id)
            if folder is not None:
                return folder
        return None

    def _walk(self, kind: str, root: Path, here: Path, depth: int, out: list[_Folder]) -> None:
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError:
            return
        if here != root:
            folder = self._folder(kind, root, here)
            if folder is not None:
                out.append(folder)
                return
            if _holds_weights(here) or _managed(here):
                return  # a fetched model, or a bad name already logged: nothing nests under it
        if depth == 0:
            return
        for entry in entries:
            if not entry.name.startswith(".") and entry.is_dir():
                self._walk(kind, root, Path(entry.path), depth - 1, out)

    def _folder(self, kind: str, root: Path, path: Path) -> _Folder | None:
        """The model folder at ``path`` when it is one placed by hand with a good id; else None."""
        if not path.is_dir() or not _holds_weights(path) or _managed(path):
            return None
        rel = path.relative_to(root).as_posix()
        try:
            model_id = normalize_model_id(rel)
        except LlmlbError as exc:
            model_id, why = "", exc.message
        else:
            why = "" if model_id == rel else f"the folder name must be the id's normal form {model_id!r}"
        if why:
            if path not in self._told_bad:
                self._told_bad.add(path)
                log.warning("local_model.bad_id", path=str(path), error=why)
            return None
        names: list[str] = []
        newest = 0.0
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                rel_name = Path(dirpath, name).relative_to(path).as_posix()
                if name.startswith(".") or name.endswith(PARTIAL_SUFFIX) or not is_manifest_file(rel_name):
                    continue
                with contextlib.suppress(OSError):
                    newest = max(newest, os.stat(Path(dirpath, name)).st_mtime)
                    names.append(rel_name)
        return _Folder(model_id, path, kind, tuple(sorted(names)), time.time() - newest >= SETTLE_S)


def _holds_weights(path: Path) -> bool:
    try:
        return any(e.is_file() and classify(e.name) in WEIGHTS for e in os.scandir(path))
    except OSError:
        return False


def _managed(path: Path) -> bool:
    """A folder this node fetched (or another process fetched into a shared models dir)."""
    meta = path / META_DIR / "manifest.json"
    try:
        source = json.loads(meta.read_text()).get("source", "")
    except (OSError, ValueError, AttributeError):
        return False
    return str(source) != ModelSource.LOCAL.value
