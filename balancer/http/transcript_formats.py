"""Renders a ``Transcript`` in OpenAI's ``response_format`` values: json, text, verbose_json, srt, vtt.

Pure functions: the node returns structured segments, the HTTP door picks the rendering.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from common.errors import ErrorCode, LlmlbError
from common.inference import Transcript


class ResponseFormat(enum.StrEnum):
    JSON = "json"
    TEXT = "text"
    VERBOSE_JSON = "verbose_json"
    SRT = "srt"
    VTT = "vtt"


CONTENT_TYPES: dict[ResponseFormat, str] = {
    ResponseFormat.JSON: "application/json",
    ResponseFormat.VERBOSE_JSON: "application/json",
    ResponseFormat.TEXT: "text/plain; charset=utf-8",
    ResponseFormat.SRT: "application/x-subrip; charset=utf-8",
    ResponseFormat.VTT: "text/vtt; charset=utf-8",
}


def parse_format(value: str) -> ResponseFormat:
    """The format named by ``value`` (empty means json); anything else is ``invalid_request``."""
    try:
        return ResponseFormat(value or "json")
    except ValueError:
        allowed = ", ".join(f.value for f in ResponseFormat)
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST, f"response_format must be one of {allowed}; got {value!r}"
        ) from None


def _timestamp(seconds: float, decimal: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def to_json(transcript: Transcript) -> dict[str, Any]:
    return {"text": transcript.text}


def to_verbose_json(transcript: Transcript) -> dict[str, Any]:
    return {
        "task": "transcribe",
        "language": transcript.language,
        "duration": transcript.duration,
        "text": transcript.text,
        "segments": [
            {
                "id": s.id,
                "seek": 0,
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "tokens": list(s.tokens),
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for s in transcript.segments
        ],
    }


def to_text(transcript: Transcript) -> str:
    return transcript.text + "\n"


def to_srt(transcript: Transcript) -> str:
    blocks = [
        f"{n}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for n, s in enumerate(transcript.segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(transcript: Transcript) -> str:
    blocks = [
        f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n"
        for s in transcript.segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render(transcript: Transcript, response_format: ResponseFormat) -> tuple[str, str]:
    """The response body and its content type for ``response_format``."""
    match response_format:
        case ResponseFormat.JSON:
            body = json.dumps(to_json(transcript), ensure_ascii=False)
        case ResponseFormat.VERBOSE_JSON:
            body = json.dumps(to_verbose_json(transcript), ensure_ascii=False)
        case ResponseFormat.TEXT:
            body = to_text(transcript)
        case ResponseFormat.SRT:
            body = to_srt(transcript)
        case ResponseFormat.VTT:
            body = to_vtt(transcript)
    return body, CONTENT_TYPES[response_format]
