"""Client channels to llmlb's gRPC services: TLS when asked, and the bearer key on every call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from common.rpc import AUTHORIZATION, CHANNEL_OPTIONS


def bearer_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"Bearer {api_key}"),) if api_key else ()


# A key, or what reads the current one at each call (a token that rotates, e.g. the fleet token).
ApiKeySource = str | Callable[[], str]


class _KeyDetails:
    def __init__(self, api_key: ApiKeySource) -> None:
        self._key = api_key
        self._metadata = bearer_metadata(api_key) if isinstance(api_key, str) else ()

    def _details(self, details: Any) -> Any:
        metadata = self._metadata if isinstance(self._key, str) else bearer_metadata(self._key())
        return details._replace(metadata=tuple(details.metadata or ()) + metadata)


# grpc.aio files an interceptor under the first call kind it matches, so each kind needs its own class.
class _UnaryUnaryKey(_KeyDetails, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamKey(_KeyDetails, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnaryKey(_KeyDetails, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStreamKey(_KeyDetails, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)


def key_interceptors(api_key: ApiKeySource) -> list[Any]:
    """Client interceptors adding ``authorization: Bearer <key>`` to every kind of call.

    A callable ``api_key`` is read at each call, so one channel follows a token that rotates.
    """
    kinds = (_UnaryUnaryKey, _UnaryStreamKey, _StreamUnaryKey, _StreamStreamKey)
    return [kind(api_key) for kind in kinds] if api_key else []


def client_credentials(
    tls_ca: Path | None, tls_cert: Path | None = None, tls_key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials trusting ``tls_ca`` (presenting a client certificate for mTLS); None: plaintext."""
    if tls_ca is None:
        return None
    cert = tls_cert.read_bytes() if tls_cert else None
    key = tls_key.read_bytes() if tls_key else None
    return grpc.ssl_channel_credentials(tls_ca.read_bytes(), key, cert)


def open_channel(
    target: str,
    *,
    api_key: ApiKeySource = "",
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` that presents ``api_key`` (read at each call when callable) and
    speaks TLS when ``tls_ca`` is set."""
    interceptors: Any = key_interceptors(api_key) or None
    credentials = client_credentials(tls_ca, tls_cert, tls_key)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS, interceptors=interceptors)


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS for a server; with ``client_ca`` every caller must present a certificate it signed (mTLS)."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
