"""Streaming answers that stop the work behind them when the client goes away.

``StreamingAnswer`` sends an async iterator of bytes (``encoded``: a plane's ``Stream``, encoded)
while watching for the client's disconnect; on a disconnect it cancels the sender, which closes the
iterator and with it the stream, so the node stops. ``Disconnect`` does the same for work whose answer
is sent in one piece (the door's watch, given to the inference plane).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from balancer.edge.plane import Stream
from common.errors import ErrorCode, LlmlbError

T = TypeVar("T")


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The HTTP door's ``Watch`` (``balancer.edge.plane``): work it is given stops on a disconnect."""

    receive: Receive

    async def __call__(self, work: Awaitable[T]) -> T:
        """The result of ``work``; if the client disconnects first, ``work`` is cancelled.

        Call it once the request body has been read: from then on ``receive`` only reports a disconnect.
        """
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(_disconnected(self.receive))
        try:
            await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise LlmlbError(ErrorCode.CANCELLED, "the client closed the connection")
        return task.result()


async def encoded(
    stream: Stream[T],
    encode: Callable[[T], Iterable[bytes]],
    fail: Callable[[LlmlbError], Iterable[bytes]],
    start: Iterable[bytes] = (),
    end: Callable[[], Iterable[bytes]] = tuple,
) -> AsyncGenerator[bytes, None]:
    """``stream``'s items as bytes: ``start``, each item, then ``end``; an error once the answer has
    begun is ended with what ``fail`` makes of it (the status is sent already). Closing it closes
    ``stream``, which the plane records as a cancellation."""
    try:
        for piece in start:
            yield piece
        async for item in stream:
            for piece in encode(item):
                yield piece
        for piece in end():
            yield piece
    except LlmlbError as err:
        await stream.close(err)
        for piece in fail(err):
            yield piece
    except Exception as exc:
        await stream.close(exc)
        for piece in fail(LlmlbError(ErrorCode.INTERNAL, "internal error; see the server log")):
            yield piece
    finally:
        await stream.aclose()


class StreamingAnswer(Response):
    """Sends ``body`` as it is produced; a client disconnect closes ``body`` at once."""

    def __init__(
        self, body: AsyncGenerator[bytes, None], *, media_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self.body_iterator = body
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def _send_all(self, send: Send) -> None:
        body = self.body_iterator
        start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        started = False
        try:
            # The first piece is pulled before anything is sent, so the producer has started and its
            # cleanup runs on aclose() even when the very first send fails.
            async for piece in body:
                if not started:
                    await send(start)
                    started = True
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            if not started:
                await send(start)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await body.aclose()  # runs the producer's cleanup now, not when it is collected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = asyncio.ensure_future(self._send_all(send))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((sender, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not sender.done():
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
