"""Streaming one file's bytes from a Hugging Face hub, from any offset.

Both processes use it: the balancer's ``Manifest.ReadBlob`` passes the bytes through to a node, and a
node's downloader writes them to a ``.partial`` file. ``huggingface_hub`` builds the URL and headers,
so the hub protocol (``/resolve/<revision>/``, auth, LFS redirects) is the library's; httpx streams the
body with a ``Range`` header, because the node resumes from the exact byte it stopped at.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from huggingface_hub import hf_hub_url
from huggingface_hub.utils._headers import build_hf_headers

from common.errors import ErrorCode, LlmlbError
from common.secret import Secret

CHUNK_BYTES = 256 * 1024


class HubFiles:
    """An HTTP client for file bodies on one or more hubs, sharing one connection pool."""

    def __init__(self, *, token: Secret | None, timeout_s: float, library: str) -> None:
        self._token = token
        self._timeout_s = timeout_s
        self._library = library
        self._http: httpx.AsyncClient | None = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                # token=False: never pick up a token from the developer's hub cache, only the configured one.
                headers=build_hf_headers(
                    token=self._token.reveal() if self._token else False, library_name=self._library
                ),
                follow_redirects=True,  # LFS files redirect to a CDN; httpx drops auth across hosts
                timeout=httpx.Timeout(self._timeout_s),
            )
        return self._http

    async def stream(
        self,
        endpoint: str,
        repo_id: str,
        revision: str,
        filename: str,
        offset: int = 0,
        length: int = 0,
    ) -> AsyncIterator[bytes]:
        """Yields the bytes of ``filename`` from ``offset`` (``length`` bytes, or to the end), in order."""
        url = hf_hub_url(repo_id, filename, revision=revision or "main", endpoint=endpoint.rstrip("/"))
        headers = {}
        if offset or length:
            headers["range"] = f"bytes={offset}-" + (str(offset + length - 1) if length else "")
        try:
            async with self._client().stream("GET", url, headers=headers) as response:
                if response.status_code == 416:
                    raise LlmlbError(
                        ErrorCode.INVALID_REQUEST, f"offset {offset} is past the end of {filename}"
                    )
                if response.status_code in (401, 403):
                    raise LlmlbError(
                        ErrorCode.ORIGIN_UNAUTHORIZED,
                        f"origin refused {repo_id}/{filename} ({response.status_code}); check HF_TOKEN",
                    )
                if response.status_code == 404:
                    raise LlmlbError(
                        ErrorCode.MODEL_NOT_FOUND, f"{filename} not found in {repo_id}@{revision}"
                    )
                if response.status_code >= 400:
                    raise LlmlbError(
                        ErrorCode.DOWNLOAD_FAILED, f"origin answered {response.status_code} for {filename}"
                    )
                if headers and response.status_code != 206:
                    raise LlmlbError(
                        ErrorCode.DOWNLOAD_FAILED, f"origin ignored the byte range for {filename}"
                    )
                async for chunk in response.aiter_bytes(CHUNK_BYTES):
                    yield chunk
        except httpx.HTTPError as exc:
            raise LlmlbError(
                ErrorCode.DOWNLOAD_FAILED, f"origin transfer of {filename} failed: {exc!r}"
            ) from None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
