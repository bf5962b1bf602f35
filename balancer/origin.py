"""The allowlisted model origin (a Hugging Face hub): pinning repositories and streaming their files.

Nothing here writes to disk: listings come from the hub API, and file bytes are streamed straight
through to the caller (``Manifest.ReadBlob`` on the balancer is a pass-through proxy).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from common.config import BalancerConfig, normalize_origin
from common.errors import ErrorCode, LlmlbError
from common.hub import HubFiles

log = structlog.get_logger(__name__)

# Non-LFS files up to this size are hashed at registration so nodes can verify every file.
HASH_SMALL_FILES_UP_TO = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RemoteFile:
    filename: str
    size_bytes: int
    sha256: str  # empty when the origin does not publish it


@dataclass(frozen=True, slots=True)
class PinnedRepo:
    """A repository listed at one commit."""

    origin: str
    repo_id: str
    revision: str  # the commit sha the requested branch/tag/sha resolved to
    files: list[RemoteFile]


class Origin:
    """Talks to the allowlisted origins with ``huggingface_hub`` (listing) and httpx (bytes)."""

    def __init__(self, config: BalancerConfig) -> None:
        self._config = config
        self._allowed = {normalize_origin(o) for o in config.allowed_origins}
        self._files = HubFiles(
            token=config.hf_token, timeout_s=config.origin_timeout_s, library="llmlb-balancer"
        )

    @property
    def default(self) -> str:
        return self._config.hf_endpoint

    def check_allowed(self, origin: str) -> str:
        """The origin's normal form, or ``origin_not_allowed`` before any byte is sent to it."""
        try:
            normal = normalize_origin(origin)
        except ValueError as exc:
            raise LlmlbError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        if normal not in self._allowed:
            raise LlmlbError(
                ErrorCode.ORIGIN_NOT_ALLOWED,
                f"origin {normal} is not allowed; allowed origins: {', '.join(sorted(self._allowed))} "
                "(set LLMLB_ALLOWED_ORIGINS to change)",
            )
        return normal

    def _base_url(self, origin: str) -> str:
        # Keep the configured spelling (a path prefix on a mirror survives) for the default origin.
        if normalize_origin(origin) == normalize_origin(self.default):
            return self.default
        return origin.rstrip("/")

    async def pin(self, origin: str, repo_id: str, revision: str) -> PinnedRepo:
        """Lists ``repo_id`` at ``revision`` (branch, tag or sha), pinned to the commit it resolves to."""
        origin = self.check_allowed(origin)
        api = HfApi(
            endpoint=self._base_url(origin),
            token=self._config.hf_token.reveal() if self._config.hf_token else False,
        )
        try:
            info = await asyncio.to_thread(
                api.model_info,
                repo_id,
                revision=revision or "main",
                files_metadata=True,
                timeout=self._config.origin_timeout_s,
            )
        except Exception as exc:
            raise self._translate(exc, repo_id, revision) from None
        if not info.sha:
            raise LlmlbError(ErrorCode.ORIGIN_UNREACHABLE, f"origin gave no commit for {repo_id}@{revision}")
        files: list[RemoteFile] = []
        for sibling in info.siblings or []:
            lfs = sibling.lfs
            size = lfs.size if lfs is not None else sibling.size
            files.append(
                RemoteFile(sibling.rfilename, int(size or 0), (lfs.sha256 if lfs is not None else "") or "")
            )
        return PinnedRepo(origin=origin, repo_id=repo_id, revision=info.sha, files=files)

    async def hash_missing(self, pinned: PinnedRepo, wanted: set[str]) -> PinnedRepo:
        """Fills in sha256 for small files the origin publishes no digest for (streamed, never stored)."""
        sem = asyncio.Semaphore(4)

        async def fill(f: RemoteFile) -> RemoteFile:
            if f.sha256 or f.filename not in wanted or f.size_bytes > HASH_SMALL_FILES_UP_TO:
                return f
            digest = hashlib.sha256()
            async with sem:
                async for chunk in self.stream(pinned.origin, pinned.repo_id, pinned.revision, f.filename):
                    digest.update(chunk)
            return RemoteFile(f.filename, f.size_bytes, digest.hexdigest())

        files = await asyncio.gather(*(fill(f) for f in pinned.files))
        return PinnedRepo(pinned.origin, pinned.repo_id, pinned.revision, list(files))

    async def stream(
        self, origin: str, repo_id: str, revision: str, filename: str, offset: int = 0, length: int = 0
    ) -> AsyncIterator[bytes]:
        """Yields the bytes of one file from ``offset`` (``length`` bytes, or to the end), in order."""
        origin = self.check_allowed(origin)
        async for chunk in self._files.stream(
            self._base_url(origin), repo_id, revision or "main", filename, offset, length
        ):
            yield chunk

    async def close(self) -> None:
        await self._files.close()

    def _translate(self, exc: Exception, repo_id: str, revision: str) -> LlmlbError:
        where = f"{repo_id}@{revision or 'main'}"
        status = _status_of(exc)
        if isinstance(exc, HFValidationError):  # refused before any request: the caller's input is wrong
            return LlmlbError(ErrorCode.INVALID_REQUEST, f"invalid repo_id or revision {where!r}: {exc}")
        if isinstance(exc, GatedRepoError):
            return LlmlbError(
                ErrorCode.ORIGIN_UNAUTHORIZED,
                f"{repo_id} is gated: accept its terms on the hub and set HF_TOKEN on the balancer",
            )
        if isinstance(exc, RepositoryNotFoundError):
            if status in (401, 403):
                hint = (
                    "set HF_TOKEN on the balancer" if not self._config.hf_token else "check HF_TOKEN's access"
                )
                return LlmlbError(
                    ErrorCode.ORIGIN_UNAUTHORIZED,
                    f"origin refused access to {repo_id} ({status}): it is private or does not exist; {hint}",
                )
            return LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"repository {repo_id} not found at the origin")
        if isinstance(exc, RevisionNotFoundError):
            return LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"revision {revision!r} not found in {repo_id}")
        if isinstance(exc, HfHubHTTPError) and status is not None:
            if status in (401, 403):
                return LlmlbError(ErrorCode.ORIGIN_UNAUTHORIZED, f"origin refused {where} ({status})")
            if status == 404:
                return LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"{where} not found at the origin")
            return LlmlbError(ErrorCode.ORIGIN_UNREACHABLE, f"origin answered {status} for {where}")
        log.warning("origin.error", repo_id=repo_id, error=repr(exc))
        return LlmlbError(
            ErrorCode.ORIGIN_UNREACHABLE, f"origin unreachable for {where}: {type(exc).__name__}"
        )


def _status_of(exc: Exception) -> int | None:
    response: Any = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return int(status) if status is not None else None
