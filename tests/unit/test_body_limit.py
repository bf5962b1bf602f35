"""One size limit for both doors: ``LLMLB_MAX_BODY_MB`` bounds an HTTP body and a gRPC message alike.

The same upload goes through each door of a balancer started with a 1 MiB limit: over it, HTTP answers
413 ``payload_too_large`` and gRPC RESOURCE_EXHAUSTED before anything else looks at the call; under it,
both doors read it and judge what it asks for (no such model here).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from common.errors import ErrorCode
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.types import Scope
from tests.fixtures.doors import CALL_TIMEOUT_S, Doors, http_error, open_doors

pytestmark = pytest.mark.timeout(60)
MIB = 1024 * 1024
UNDER = b"\0" * (MIB // 2)
OVER = b"\0" * (3 * MIB)  # over the 1 MiB body and the 1 MiB a gRPC message may carry beside it
MODEL = "no-such-model"


@pytest.fixture
async def doors(tmp_path: Path) -> AsyncIterator[Doors]:
    async with open_doors(tmp_path / "balancer", env={"LLMLB_MAX_BODY_MB": "1"}) as opened:
        yield opened


async def transcribe_grpc(doors: Doors, audio: bytes) -> grpc.aio.AioRpcError:
    request = ipb.TranscribeRequest(model=MODEL, audio=audio, filename="a.wav")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await doors.inference.Transcribe(request, metadata=doors.metadata(Scope.API), timeout=CALL_TIMEOUT_S)
    return failed.value


async def transcribe_http(doors: Doors, audio: bytes) -> tuple[int, ErrorCode]:
    answer = await doors.http.post(
        "/v1/audio/transcriptions",
        files={"file": ("a.wav", audio, "audio/wav")},
        data={"model": MODEL},
        headers=doors.headers(Scope.API),
    )
    status, error = http_error(answer)
    return status, error.code


async def test_a_grpc_message_over_the_body_limit_is_refused_as_resource_exhausted(doors: Doors) -> None:
    refused = await transcribe_grpc(doors, OVER)
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await transcribe_http(doors, OVER) == (413, ErrorCode.PAYLOAD_TOO_LARGE)


async def test_a_grpc_message_under_the_body_limit_is_read_and_judged(doors: Doors) -> None:
    answered = await transcribe_grpc(doors, UNDER)
    assert answered.code() is grpc.StatusCode.NOT_FOUND, answered.details()
    status, code = await transcribe_http(doors, UNDER)
    assert (status, code) == (404, ErrorCode.MODEL_NOT_FOUND)
