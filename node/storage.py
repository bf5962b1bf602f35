"""A node's models dir: ``<models_dir>/<model-id>/<files>``, what is valid there, and deleting a copy.

Beside each model's files a ``.llmlb/`` folder keeps the node's own bookkeeping: the manifest the
files were fetched for (so a restarted node can resume and serve without the balancer) and one
verified-marker per file, so a restart does not hash gigabytes again. A marker holds the size, mtime
and sha256 a file had when it was hashed; a file whose size or mtime moved is hashed again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog
from google.protobuf import json_format

from common import converters
from common.errors import ErrorCode, LlmlbError
from common.formats import check_filename
from common.model_id import model_dir, normalize_model_id
from common.pb.llmlb.v1 import types_pb2 as pb
from common.types import ManifestFile, Model
from node.pieces import held_bytes

log = structlog.get_logger(__name__)

META_DIR = ".llmlb"
LOCKS_DIR = ".locks"  # <models_dir>/.locks/<model-id>/<file>.lock: never inside a model's own folder
PARTIAL_SUFFIX = ".partial"
HASH_CHUNK = 1024 * 1024


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def sha256_file(path: Path, upto: int | None = None) -> str:
    """sha256 of a file (or of its first ``upto`` bytes), read in 1 MiB pieces: memory stays flat."""
    return hash_file(path, upto).hexdigest()


def hash_file(path: Path, upto: int | None = None) -> hashlib._Hash:
    digest = hashlib.sha256()
    left = upto
    with path.open("rb") as fh:
        while left is None or left > 0:
            chunk = fh.read(HASH_CHUNK if left is None else min(HASH_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a file looked like when it was hashed."""

    size: int
    mtime_ns: int
    sha256: str
    inode: int = -1  # a file replaced by another of the same size and mtime is still a new file


class Verifier:
    """Decides whether a file on disk is the manifest's file, hashing each version of it only once.

    Results are remembered in memory by path, size, mtime and inode, and in a marker file under this
    node's models dir, so a restart does not hash gigabytes again: beside the model for its own files,
    under ``<models_dir>/.llmlb/shared-verified/`` for files on the shared dir, which is never written.
    """

    def __init__(self, io_threads: ThreadPoolExecutor) -> None:
        self._io_threads = io_threads
        self._seen: dict[Path, Fingerprint] = {}
        self._hashing: dict[tuple[Path, int, int], asyncio.Future[str]] = {}

    async def matches(self, path: Path, file: ManifestFile, marker: Path | None = None) -> bool:
        loop = asyncio.get_running_loop()
        try:
            st = await loop.run_in_executor(self._io_threads, path.stat)
        except OSError:
            return False
        if st.st_size == 0 or st.st_size != file.size_bytes:
            return False
        if not file.sha256:
            return True  # the origin published no digest: the size is all there is to check
        digest, fresh = await self._digest(path, st, marker)
        if digest != file.sha256 and fresh:  # a known mismatch was logged when it was hashed
            log.warning("file.sha256_mismatch", path=str(path), expected=file.sha256, actual=digest)
        return digest == file.sha256

    async def digest(self, path: Path, marker: Path | None = None) -> tuple[int, str]:
        """The size and sha256 of the file as it is now, hashed once per version (size, mtime, inode)."""
        st = await asyncio.get_running_loop().run_in_executor(self._io_threads, path.stat)
        return st.st_size, (await self._digest(path, st, marker))[0]

    async def _digest(self, path: Path, st: os.stat_result, marker: Path | None) -> tuple[str, bool]:
        """The file's sha256, and whether it was hashed now rather than remembered."""
        loop = asyncio.get_running_loop()
        known = self._seen.get(path) or (await loop.run_in_executor(self._io_threads, _read_marker, marker))
        if known is not None and (known.size, known.mtime_ns, known.inode) == (
            st.st_size,
            st.st_mtime_ns,
            st.st_ino,
        ):
            return known.sha256, False
        key = (path, st.st_size, st.st_mtime_ns)
        hashing = self._hashing.get(key)
        if hashing is None:  # twenty callers asking at once hash the file once
            log.info("file.hashing", path=str(path), bytes=st.st_size)
            hashing = asyncio.ensure_future(loop.run_in_executor(self._io_threads, sha256_file, path))
            self._hashing[key] = hashing
            hashing.add_done_callback(lambda _: self._hashing.pop(key, None))
        digest = await asyncio.shield(hashing)
        self._remember(path, Fingerprint(st.st_size, st.st_mtime_ns, digest, st.st_ino), marker)
        return digest, True

    def record(self, path: Path, sha256: str, marker: Path | None) -> None:
        """Remembers a file whose digest was computed while it was written (a finished download)."""
        st = path.stat()
        self._remember(path, Fingerprint(st.st_size, st.st_mtime_ns, sha256, st.st_ino), marker)

    def _remember(self, path: Path, seen: Fingerprint, marker: Path | None) -> None:
        self._seen[path] = seen
        if marker is not None:
            data = {"size": seen.size, "mtime_ns": seen.mtime_ns, "inode": seen.inode, "sha256": seen.sha256}
            try:
                _write_json(marker, data)
            except OSError as exc:  # a read-only or full models dir costs a re-hash later, nothing more
                log.warning("marker.unwritable", path=str(marker), error=repr(exc))

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    def forget_under(self, folder: Path) -> None:
        for path in [p for p in self._seen if folder in p.parents]:
            del self._seen[path]


def _read_marker(marker: Path | None) -> Fingerprint | None:
    if marker is None:
        return None
    try:
        data = json.loads(marker.read_text())
        inode = int(data.get("inode", -1))  # markers from before inodes were kept: hashed once more
        return Fingerprint(int(data["size"]), int(data["mtime_ns"]), str(data["sha256"]), inode)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_json(path: Path, data: object) -> None:
    # Written beside, then renamed: a reader never sees half a marker or manifest.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class Storage:
    """The models dir of one node (possibly shared by several node processes on one host)."""

    def __init__(self, models_dir: Path, io_threads: ThreadPoolExecutor) -> None:
        self.root = models_dir.expanduser().resolve()
        self.io_threads = io_threads
        self.verifier = Verifier(io_threads)

    def model_dir(self, model_id: str) -> Path:
        """The model's folder; ``invalid_model_id`` for a bad id, before any file is touched."""
        if normalize_model_id(model_id).split("/", 1)[0] in (META_DIR, LOCKS_DIR):
            raise LlmlbError(
                ErrorCode.INVALID_MODEL_ID, f"model id {model_id[:80]!r} names a reserved folder"
            )
        return model_dir(self.root, model_id)

    def file_path(self, model_id: str, filename: str) -> Path:
        return self._under(self.model_dir(model_id), filename)

    def meta_dir(self, model_id: str) -> Path:
        return self.model_dir(model_id) / META_DIR

    def marker_path(self, model_id: str, filename: str) -> Path:
        return self._under(self.meta_dir(model_id) / "verified", filename + ".json")

    def local_marker_path(self, kind: str, model_id: str, filename: str) -> Path:
        """Where this node remembers the digest of a file placed by hand (``kind``: models or shared)."""
        folder = model_dir(self.root / META_DIR / "local-verified" / kind, model_id)
        return self._under(folder, filename + ".json")

    def shared_marker_path(self, model_id: str, filename: str) -> Path:
        """Where this node remembers having verified a shared-dir file (the share itself is read-only)."""
        folder = model_dir(self.root / META_DIR / "shared-verified", model_id)
        return self._under(folder, filename + ".json")

    def lock_path(self, model_id: str, filename: str) -> Path:
        """The ``flock`` file of one download; kept after it (removing a lock another process holds
        open would let a third take a second lock on a new file)."""
        return self._under(model_dir(self.root / LOCKS_DIR, model_id), filename + ".lock")

    @staticmethod
    def _under(base: Path, filename: str) -> Path:
        check_filename(filename)
        if filename.split("/", 1)[0] == META_DIR:
            raise LlmlbError(ErrorCode.INVALID_REQUEST, f"file name {filename!r} is reserved")
        return base / filename

    async def is_valid(self, model_id: str, file: ManifestFile) -> bool:
        """True when the models dir holds this exact file: non-empty, right size, right sha256."""
        return await self.verifier.matches(
            self.file_path(model_id, file.filename), file, self.marker_path(model_id, file.filename)
        )

    def record_verified(self, model_id: str, filename: str, sha256: str) -> None:
        self.verifier.record(self.file_path(model_id, filename), sha256, self.marker_path(model_id, filename))

    def partial_bytes(self, model_id: str, filename: str) -> int:
        """Bytes a download in progress holds (its pieces' sidecar, else the plain prefix's length)."""
        return held_bytes(partial_path(self.file_path(model_id, filename)))

    # -- the manifest a model's files were fetched for ------------------------------------------

    def save_manifest(self, model: Model) -> None:
        text = json_format.MessageToJson(converters.model_to_pb(model))
        _write_json(self.meta_dir(model.id) / "manifest.json", json.loads(text))

    def load_manifest(self, model_id: str) -> Model | None:
        path = self.meta_dir(model_id) / "manifest.json"
        try:
            msg = json_format.Parse(path.read_text(), pb.Model(), ignore_unknown_fields=True)
        except FileNotFoundError:
            return None
        except (OSError, json_format.ParseError) as exc:
            log.warning("manifest.unreadable", path=str(path), error=repr(exc))
            return None
        return converters.model_from_pb(msg)

    def _model_dirs(self) -> Iterator[tuple[str, Path]]:
        if not self.root.is_dir():
            return
        for meta in self.root.rglob(f"{META_DIR}/manifest.json"):
            folder = meta.parent.parent
            if folder == self.root or folder.relative_to(self.root).parts[0].startswith("."):
                continue  # bookkeeping (.llmlb, .locks), never a model
            try:
                yield normalize_model_id(folder.relative_to(self.root).as_posix()), folder
            except LlmlbError:
                continue

    def known_models(self) -> list[Model]:
        """Every model this models dir holds a manifest for (complete or not)."""
        models = []
        for model_id, _ in self._model_dirs():
            model = self.load_manifest(model_id)
            if model is not None:
                models.append(model)
        return sorted(models, key=lambda m: m.id)

    def unfinished(self) -> list[str]:
        """Ids of models with a ``.partial`` file: downloads a killed node left, to resume on start."""
        ids = []
        for model_id, folder in self._model_dirs():
            if any(p.is_file() for p in folder.rglob(f"*{PARTIAL_SUFFIX}") if META_DIR not in p.parts):
                ids.append(model_id)
        return ids

    # -- deleting ------------------------------------------------------------------------------

    async def delete(self, model_id: str) -> int:
        """Removes the node's copy of a model (files, partials, bookkeeping); returns bytes freed.

        Only this models dir is touched; a model nested under this one's folder is left alone.
        """
        folder = self.model_dir(model_id)
        loop = asyncio.get_running_loop()
        freed = await loop.run_in_executor(self.io_threads, _delete_model_dir, folder, self.root)
        self.verifier.forget_under(folder)
        shared_markers = self.root / META_DIR / "shared-verified"
        await loop.run_in_executor(
            self.io_threads, _delete_model_dir, model_dir(shared_markers, model_id), shared_markers
        )
        return freed


def _delete_model_dir(folder: Path, root: Path) -> int:
    if not folder.is_dir():
        return 0
    freed = 0
    for dirpath, dirnames, filenames in os.walk(folder, topdown=True):
        here = Path(dirpath)
        # A sub-folder with its own bookkeeping is another model's (ids nest like paths).
        dirnames[:] = [d for d in dirnames if not (here / d / META_DIR / "manifest.json").exists()]
        for name in filenames:
            path = here / name
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
    shutil.rmtree(folder / META_DIR, ignore_errors=True)
    # Remove the folders left empty, bottom-up, up to (not including) the models dir.
    for dirpath, _, _ in sorted(os.walk(folder, topdown=False), key=lambda t: -len(t[0])):
        _rmdir_quiet(Path(dirpath))
    parent = folder.parent
    while parent != root and root in parent.parents:
        if not _rmdir_quiet(parent):
            break
        parent = parent.parent
    return freed


def _rmdir_quiet(path: Path) -> bool:
    try:
        path.rmdir()
        return True
    except OSError:
        return False
