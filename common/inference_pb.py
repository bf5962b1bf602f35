"""protobuf <-> ``common.inference`` types, for both processes' ``Inference`` servicers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from common.errors import ErrorCode, LlmlbError
from common.inference import (
    AudioChunk,
    AudioFormat,
    ChatMessage,
    ChatRequest,
    CompleteRequest,
    EmbedRequest,
    EmbedResponse,
    FinishReason,
    GeneratedImage,
    GenerateImageRequest,
    GenerateImageResponse,
    ImageOperation,
    ResponseFormat,
    ResponseFormatType,
    SamplingParams,
    SpeakRequest,
    TextChunk,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    TopLogprob,
    TranscribeRequest,
    Transcript,
    TranscriptSegment,
    Usage,
)
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import types_pb2 as tpb

E = TypeVar("E")

_FINISH_TO_PB = {
    FinishReason.STOP: ipb.FINISH_REASON_STOP,
    FinishReason.LENGTH: ipb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: ipb.FINISH_REASON_CANCELLED,
    FinishReason.TOOL_CALLS: ipb.FINISH_REASON_TOOL_CALLS,
}
_FINISH_FROM_PB: dict[int, FinishReason] = {int(v): k for k, v in _FINISH_TO_PB.items()}

_FORMAT_TO_PB = {
    ResponseFormatType.TEXT: ipb.ResponseFormat.TYPE_TEXT,
    ResponseFormatType.JSON_OBJECT: ipb.ResponseFormat.TYPE_JSON_OBJECT,
    ResponseFormatType.JSON_SCHEMA: ipb.ResponseFormat.TYPE_JSON_SCHEMA,
}
_FORMAT_FROM_PB: dict[int, ResponseFormatType] = {int(v): k for k, v in _FORMAT_TO_PB.items()}

_TOOL_CHOICE_TO_PB = {
    ToolChoiceMode.AUTO: ipb.ToolChoice.MODE_AUTO,
    ToolChoiceMode.NONE: ipb.ToolChoice.MODE_NONE,
    ToolChoiceMode.REQUIRED: ipb.ToolChoice.MODE_REQUIRED,
    ToolChoiceMode.FUNCTION: ipb.ToolChoice.MODE_FUNCTION,
}
_TOOL_CHOICE_FROM_PB: dict[int, ToolChoiceMode] = {int(v): k for k, v in _TOOL_CHOICE_TO_PB.items()}

_AUDIO_TO_PB = {AudioFormat.WAV: ipb.AUDIO_FORMAT_WAV, AudioFormat.PCM: ipb.AUDIO_FORMAT_PCM}
_AUDIO_FROM_PB: dict[int, AudioFormat] = {int(v): k for k, v in _AUDIO_TO_PB.items()}
_AUDIO_FROM_PB[int(ipb.AUDIO_FORMAT_UNSPECIFIED)] = AudioFormat.WAV

_IMAGE_OP_TO_PB = {
    ImageOperation.GENERATE: ipb.IMAGE_OPERATION_GENERATE,
    ImageOperation.EDIT: ipb.IMAGE_OPERATION_EDIT,
    ImageOperation.VARIATION: ipb.IMAGE_OPERATION_VARIATION,
}
_IMAGE_OP_FROM_PB: dict[int, ImageOperation] = {int(v): k for k, v in _IMAGE_OP_TO_PB.items()}
_IMAGE_OP_FROM_PB[int(ipb.IMAGE_OPERATION_UNSPECIFIED)] = ImageOperation.GENERATE


def _known(table: Mapping[int, E], value: int, name: str, allowed: str) -> E:
    """An enum value a caller sent; a number this version does not know is ``invalid_request``."""
    try:
        return table[int(value)]
    except KeyError:
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST, f"{name} {int(value)} is unknown; use {allowed}"
        ) from None


def response_format_from_pb(msg: ipb.ResponseFormat) -> ResponseFormat:
    return ResponseFormat(
        type=_known(
            _FORMAT_FROM_PB,
            msg.type,
            "response_format.type",
            "TYPE_TEXT, TYPE_JSON_OBJECT or TYPE_JSON_SCHEMA",
        ),
        schema=msg.schema,
        name=msg.name,
        strict=msg.strict,
    )


def response_format_to_pb(value: ResponseFormat) -> ipb.ResponseFormat:
    return ipb.ResponseFormat(
        type=_FORMAT_TO_PB[value.type], schema=value.schema, name=value.name, strict=value.strict
    )


def sampling_from_pb(msg: ipb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        temperature=msg.temperature if msg.HasField("temperature") else None,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        stop=tuple(msg.stop),
        seed=msg.seed if msg.HasField("seed") else None,
        presence_penalty=msg.presence_penalty if msg.HasField("presence_penalty") else None,
        frequency_penalty=msg.frequency_penalty if msg.HasField("frequency_penalty") else None,
        response_format=response_format_from_pb(msg.response_format),
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
        n=msg.n or 1,
    )


def sampling_to_pb(params: SamplingParams) -> ipb.SamplingParams:
    return ipb.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        stop=list(params.stop),
        seed=params.seed,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        response_format=response_format_to_pb(params.response_format),
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
        n=params.n,
    )


def tool_call_from_pb(msg: ipb.ToolCall) -> ToolCall:
    return ToolCall(index=msg.index, id=msg.id, name=msg.name, arguments=msg.arguments)


def tool_call_to_pb(call: ToolCall) -> ipb.ToolCall:
    return ipb.ToolCall(index=call.index, id=call.id, name=call.name, arguments=call.arguments)


def chat_message_from_pb(msg: ipb.ChatMessage) -> ChatMessage:
    return ChatMessage(
        role=msg.role,
        content=msg.content,
        name=msg.name,
        tool_calls=tuple(tool_call_from_pb(c) for c in msg.tool_calls),
        tool_call_id=msg.tool_call_id,
    )


def chat_message_to_pb(message: ChatMessage) -> ipb.ChatMessage:
    return ipb.ChatMessage(
        role=message.role,
        content=message.content,
        name=message.name,
        tool_calls=[tool_call_to_pb(c) for c in message.tool_calls],
        tool_call_id=message.tool_call_id,
    )


def tool_from_pb(msg: ipb.Tool) -> Tool:
    return Tool(name=msg.name, description=msg.description, parameters=msg.parameters, strict=msg.strict)


def tool_to_pb(tool: Tool) -> ipb.Tool:
    return ipb.Tool(
        name=tool.name, description=tool.description, parameters=tool.parameters, strict=tool.strict
    )


def tool_choice_from_pb(msg: ipb.ToolChoice) -> ToolChoice:
    mode = _known(
        _TOOL_CHOICE_FROM_PB,
        msg.mode,
        "tool_choice.mode",
        "MODE_AUTO, MODE_NONE, MODE_REQUIRED or MODE_FUNCTION",
    )
    return ToolChoice(mode=mode, function=msg.function)


def tool_choice_to_pb(choice: ToolChoice) -> ipb.ToolChoice:
    return ipb.ToolChoice(mode=_TOOL_CHOICE_TO_PB[choice.mode], function=choice.function)


def chat_request_from_pb(msg: ipb.ChatRequest) -> ChatRequest:
    return ChatRequest(
        model=msg.model,
        messages=tuple(chat_message_from_pb(m) for m in msg.messages),
        params=sampling_from_pb(msg.params),
        request_id=msg.request_id,
        user=msg.user,
        prompt_cache_key=msg.prompt_cache_key,
        tools=tuple(tool_from_pb(t) for t in msg.tools),
        tool_choice=tool_choice_from_pb(msg.tool_choice),
        parallel_tool_calls=msg.parallel_tool_calls if msg.HasField("parallel_tool_calls") else True,
    )


def chat_request_to_pb(request: ChatRequest) -> ipb.ChatRequest:
    return ipb.ChatRequest(
        model=request.model,
        messages=[chat_message_to_pb(m) for m in request.messages],
        params=sampling_to_pb(request.params),
        request_id=request.request_id,
        user=request.user,
        prompt_cache_key=request.prompt_cache_key,
        tools=[tool_to_pb(t) for t in request.tools],
        tool_choice=tool_choice_to_pb(request.tool_choice),
        parallel_tool_calls=request.parallel_tool_calls,
    )


def complete_request_from_pb(msg: ipb.CompleteRequest) -> CompleteRequest:
    return CompleteRequest(
        model=msg.model,
        prompt=msg.prompt,
        params=sampling_from_pb(msg.params),
        request_id=msg.request_id,
        echo=msg.echo,
        user=msg.user,
        prompt_cache_key=msg.prompt_cache_key,
    )


def complete_request_to_pb(request: CompleteRequest) -> ipb.CompleteRequest:
    return ipb.CompleteRequest(
        model=request.model,
        prompt=request.prompt,
        params=sampling_to_pb(request.params),
        request_id=request.request_id,
        echo=request.echo,
        user=request.user,
        prompt_cache_key=request.prompt_cache_key,
    )


def usage_to_pb(usage: Usage) -> tpb.Usage:
    return tpb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        cached_tokens=usage.cached_tokens,
    )


def usage_from_pb(msg: tpb.Usage) -> Usage:
    return Usage(
        prompt_tokens=msg.prompt_tokens,
        completion_tokens=msg.completion_tokens,
        cached_tokens=msg.cached_tokens,
    )


def text_chunk_to_pb(chunk: TextChunk) -> ipb.TextChunk:
    return ipb.TextChunk(
        request_id=chunk.request_id,
        delta=chunk.delta,
        finish_reason=_FINISH_TO_PB[chunk.finish_reason]
        if chunk.finish_reason
        else ipb.FINISH_REASON_UNSPECIFIED,
        usage=usage_to_pb(chunk.usage) if chunk.usage else None,
        node_id=chunk.node_id,
        model=chunk.model,
        created=chunk.created,
        index=chunk.index,
        logprobs=[
            ipb.TokenLogprob(
                token=t.token,
                logprob=t.logprob,
                bytes=t.bytes,
                top_logprobs=[
                    ipb.TopLogprob(token=a.token, logprob=a.logprob, bytes=a.bytes) for a in t.top_logprobs
                ],
            )
            for t in chunk.logprobs
        ],
        tool_calls=[tool_call_to_pb(c) for c in chunk.tool_calls],
    )


def text_chunk_from_pb(msg: ipb.TextChunk) -> TextChunk:
    return TextChunk(
        request_id=msg.request_id,
        delta=msg.delta,
        finish_reason=_FINISH_FROM_PB.get(int(msg.finish_reason)),
        usage=usage_from_pb(msg.usage) if msg.HasField("usage") else None,
        node_id=msg.node_id,
        model=msg.model,
        created=msg.created,
        index=msg.index,
        logprobs=tuple(
            TokenLogprob(
                token=t.token,
                logprob=t.logprob,
                bytes=t.bytes,
                top_logprobs=tuple(TopLogprob(a.token, a.logprob, a.bytes) for a in t.top_logprobs),
            )
            for t in msg.logprobs
        ),
        tool_calls=tuple(tool_call_from_pb(c) for c in msg.tool_calls),
    )


def embed_request_from_pb(msg: ipb.EmbedRequest) -> EmbedRequest:
    return EmbedRequest(
        model=msg.model,
        input=tuple(msg.input),
        request_id=msg.request_id,
        dimensions=msg.dimensions if msg.HasField("dimensions") else None,
        user=msg.user,
    )


def embed_request_to_pb(request: EmbedRequest) -> ipb.EmbedRequest:
    return ipb.EmbedRequest(
        model=request.model,
        input=list(request.input),
        request_id=request.request_id,
        dimensions=request.dimensions,
        user=request.user,
    )


def embed_response_to_pb(response: EmbedResponse) -> ipb.EmbedResponse:
    return ipb.EmbedResponse(
        model=response.model,
        data=[ipb.Embedding(index=i, values=list(v)) for i, v in enumerate(response.data)],
        usage=usage_to_pb(response.usage),
        node_id=response.node_id,
    )


def embed_response_from_pb(msg: ipb.EmbedResponse) -> EmbedResponse:
    ordered = sorted(msg.data, key=lambda e: e.index)
    return EmbedResponse(
        model=msg.model,
        data=tuple(tuple(e.values) for e in ordered),
        usage=usage_from_pb(msg.usage),
        node_id=msg.node_id,
    )


def transcribe_request_from_pb(msg: ipb.TranscribeRequest) -> TranscribeRequest:
    return TranscribeRequest(
        model=msg.model,
        audio=msg.audio,
        filename=msg.filename,
        language=msg.language,
        prompt=msg.prompt,
        temperature=msg.temperature if msg.HasField("temperature") else None,
        request_id=msg.request_id,
    )


def transcribe_request_to_pb(request: TranscribeRequest) -> ipb.TranscribeRequest:
    return ipb.TranscribeRequest(
        model=request.model,
        audio=request.audio,
        filename=request.filename,
        language=request.language,
        prompt=request.prompt,
        temperature=request.temperature,
        request_id=request.request_id,
    )


def transcript_to_pb(transcript: Transcript) -> ipb.TranscribeResponse:
    return ipb.TranscribeResponse(
        text=transcript.text,
        language=transcript.language,
        duration=transcript.duration,
        segments=[
            ipb.TranscriptSegment(
                id=s.id,
                start=s.start,
                end=s.end,
                text=s.text,
                avg_logprob=s.avg_logprob,
                no_speech_prob=s.no_speech_prob,
                compression_ratio=s.compression_ratio,
                temperature=s.temperature,
                tokens=list(s.tokens),
            )
            for s in transcript.segments
        ],
        node_id=transcript.node_id,
    )


def transcript_from_pb(msg: ipb.TranscribeResponse) -> Transcript:
    return Transcript(
        text=msg.text,
        language=msg.language,
        duration=msg.duration,
        segments=tuple(
            TranscriptSegment(
                id=s.id,
                start=s.start,
                end=s.end,
                text=s.text,
                avg_logprob=s.avg_logprob,
                no_speech_prob=s.no_speech_prob,
                compression_ratio=s.compression_ratio,
                temperature=s.temperature,
                tokens=tuple(s.tokens),
            )
            for s in msg.segments
        ),
        node_id=msg.node_id,
    )


def speak_request_from_pb(msg: ipb.SpeakRequest) -> SpeakRequest:
    return SpeakRequest(
        model=msg.model,
        input=msg.input,
        voice=msg.voice,
        format=_known(_AUDIO_FROM_PB, msg.format, "format", "WAV or PCM"),
        speed=msg.speed if msg.HasField("speed") else None,
        request_id=msg.request_id,
    )


def speak_request_to_pb(request: SpeakRequest) -> ipb.SpeakRequest:
    return ipb.SpeakRequest(
        model=request.model,
        input=request.input,
        voice=request.voice,
        format=_AUDIO_TO_PB[request.format],
        speed=request.speed,
        request_id=request.request_id,
    )


def audio_chunk_to_pb(chunk: AudioChunk) -> ipb.AudioChunk:
    return ipb.AudioChunk(
        data=chunk.data,
        sample_rate=chunk.sample_rate,
        channels=chunk.channels,
        sample_width=chunk.sample_width,
        format=_AUDIO_TO_PB[chunk.format],
        last=chunk.last,
    )


def audio_chunk_from_pb(msg: ipb.AudioChunk) -> AudioChunk:
    return AudioChunk(
        data=msg.data,
        sample_rate=msg.sample_rate,
        channels=msg.channels,
        sample_width=msg.sample_width,
        format=_AUDIO_FROM_PB.get(int(msg.format), AudioFormat.WAV),
        last=msg.last,
    )


def image_request_from_pb(msg: ipb.GenerateImageRequest) -> GenerateImageRequest:
    return GenerateImageRequest(
        model=msg.model,
        prompt=msg.prompt,
        operation=_known(_IMAGE_OP_FROM_PB, msg.operation, "operation", "GENERATE, EDIT or VARIATION"),
        negative_prompt=msg.negative_prompt,
        n=msg.n or 1,
        width=msg.width,
        height=msg.height,
        steps=msg.steps,
        cfg_scale=msg.cfg_scale if msg.HasField("cfg_scale") else None,
        seed=msg.seed if msg.HasField("seed") else None,
        image=msg.image,
        mask=msg.mask,
        request_id=msg.request_id,
    )


def image_request_to_pb(request: GenerateImageRequest) -> ipb.GenerateImageRequest:
    return ipb.GenerateImageRequest(
        model=request.model,
        operation=_IMAGE_OP_TO_PB[request.operation],
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        n=request.n,
        width=request.width,
        height=request.height,
        steps=request.steps,
        cfg_scale=request.cfg_scale,
        seed=request.seed,
        image=request.image,
        mask=request.mask,
        request_id=request.request_id,
    )


def image_response_to_pb(response: GenerateImageResponse) -> ipb.GenerateImageResponse:
    return ipb.GenerateImageResponse(
        images=[
            ipb.GeneratedImage(png=i.png, seed=i.seed, revised_prompt=i.revised_prompt)
            for i in response.images
        ],
        node_id=response.node_id,
    )


def image_response_from_pb(msg: ipb.GenerateImageResponse) -> GenerateImageResponse:
    return GenerateImageResponse(
        images=tuple(
            GeneratedImage(png=i.png, seed=i.seed, revised_prompt=i.revised_prompt) for i in msg.images
        ),
        node_id=msg.node_id,
    )
