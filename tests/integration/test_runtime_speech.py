"""Piper (onnxruntime) speaks, faster-whisper transcribes: real models, and a real round trip between them."""

from __future__ import annotations

import io
import json
import os
import threading
import wave
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from balancer.http.transcript_formats import ResponseFormat, render
from common.errors import ErrorCode, LlmlbError
from common.inference import AudioFormat, SpeakRequest, TranscribeRequest
from devkit.model_files import ModelFiles
from node.runtimes.base import LoadContext, RuntimeSettings
from node.runtimes.piper import PiperRuntime
from node.runtimes.whisper import WhisperRuntime
from tests.fixtures.espeak import espeak, open_espeak
from tests.fixtures.models import SENTENCE, assert_heard, speak_wav, word_errors, words

pytestmark = pytest.mark.slow


def read_wav(data: bytes) -> tuple[int, np.ndarray]:
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        rate = wav.getframerate()
        frames = wav.readframes(wav.getnframes())
    return rate, np.frombuffer(frames, dtype="<i2")


def transcode(wav_bytes: bytes, container: str, codec: str, rate: int) -> bytes:
    out = io.BytesIO()
    src: Any
    dst: Any
    with av.open(io.BytesIO(wav_bytes)) as src, av.open(out, "w", format=container) as dst:
        stream: Any = dst.add_stream(codec, rate=rate)
        resampler = av.AudioResampler(format=stream.format, layout="mono", rate=rate)
        for frame in src.decode(audio=0):
            for converted in resampler.resample(frame):
                for packet in stream.encode(converted):
                    dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    return out.getvalue()


def test_piper_speaks_audible_wav_at_the_voice_rate(speech_clip: bytes) -> None:
    rate, samples = read_wav(speech_clip)
    assert rate == 22050
    seconds = len(samples) / rate
    assert 1.5 < seconds < 6.0
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
    assert rms > 500  # speech, not silence (full scale is 32767)


def test_piper_streams_header_first_then_samples_and_a_last_marker(piper_runtime: PiperRuntime) -> None:
    request = SpeakRequest("piper", "First sentence here. And a second one.", format=AudioFormat.WAV)
    chunks = list(piper_runtime.speak(request, threading.Event()))
    assert chunks[0].data.startswith(b"RIFF") and len(chunks[0].data) == 44
    assert len(chunks) >= 4  # header, at least one piece per sentence, the last marker
    assert chunks[-1].last and not any(c.last for c in chunks[:-1])
    assert {(c.sample_rate, c.channels, c.sample_width) for c in chunks} == {(22050, 1, 2)}


def test_piper_pcm_is_raw_samples_and_speed_shortens_it(piper_runtime: PiperRuntime) -> None:
    # Piper draws each phoneme's length at random (noise_w): over four words one draw in a few hundred
    # made speed 2 barely shorter. Over a long sentence the draws even out: in 150 of each, the longest
    # fast take was 0.71 of the shortest normal one.
    text = "Hello from the node, which reads this sentence aloud at the speed it is asked for."

    def pcm(speed: float) -> bytes:
        request = SpeakRequest("piper", text, format=AudioFormat.PCM, speed=speed)
        return b"".join(c.data for c in piper_runtime.speak(request, threading.Event()))

    normal, fast = pcm(1.0), pcm(2.0)
    assert not normal.startswith(b"RIFF") and len(normal) % 2 == 0
    assert len(fast) < 0.75 * len(normal)


def test_whisper_transcribes_the_spoken_sentence(whisper_runtime: WhisperRuntime, speech_clip: bytes) -> None:
    transcript = whisper_runtime.transcribe(TranscribeRequest("whisper-base", speech_clip, "clip.wav"))
    assert_heard(transcript.text, SENTENCE)
    assert transcript.language == "en"
    assert 1.5 < transcript.duration < 6.0
    assert transcript.segments and transcript.segments[0].id == 0
    assert transcript.segments[-1].end <= transcript.duration + 0.5


def test_round_trip_of_another_sentence(piper_runtime: PiperRuntime, whisper_runtime: WhisperRuntime) -> None:
    sentence = "Please send the report to the team before Friday."
    transcript = whisper_runtime.transcribe(TranscribeRequest("w", speak_wav(piper_runtime, sentence)))
    assert_heard(transcript.text, sentence)


def test_word_errors_counts_each_substitution_insertion_and_deletion() -> None:
    said = "please send the report"
    assert word_errors("Please send the report.", said) == 0
    assert word_errors("please send a report", said) == 1
    assert word_errors("please send report", said) == 1
    assert word_errors("please do send the report now", said) == 2
    assert word_errors("something else entirely", said) == 4


@pytest.mark.parametrize(
    ("container", "codec", "name", "rate"),
    [
        ("flac", "flac", "a.flac", 22050),
        ("ogg", "libopus", "a.ogg", 48000),
        ("mp3", "libmp3lame", "a.mp3", 22050),
    ],
)
def test_whisper_reads_flac_ogg_and_mp3(
    whisper_runtime: WhisperRuntime, speech_clip: bytes, container: str, codec: str, name: str, rate: int
) -> None:
    try:
        data = transcode(speech_clip, container, codec, rate)
    except (av.error.FFmpegError, ValueError) as exc:
        pytest.fail(f"this PyAV build cannot write {container}: {exc}")
    transcript = whisper_runtime.transcribe(TranscribeRequest("w", data, name))
    # Piper draws phoneme lengths at random, and a lossy re-encoding of one take was once heard with
    # "quick" as another word: one word off is the same tolerance every transcript check here has.
    assert_heard(transcript.text, SENTENCE)


def test_whisper_with_a_given_language_reports_it(
    whisper_runtime: WhisperRuntime, speech_clip: bytes
) -> None:
    transcript = whisper_runtime.transcribe(TranscribeRequest("w", speech_clip, language="en"))
    assert transcript.language == "en" and "fox" in words(transcript.text)


@pytest.mark.parametrize(
    "data", [b"this is plain text, not audio at all" * 10, b"RIFF\x24\x08\x00\x00WAVEfmt ", b"\x00" * 7]
)
def test_non_audio_or_truncated_input_is_invalid_request(
    whisper_runtime: WhisperRuntime, data: bytes
) -> None:
    with pytest.raises(LlmlbError) as caught:
        whisper_runtime.transcribe(TranscribeRequest("w", data, "upload.wav"))
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert "upload.wav" in caught.value.message


def test_a_clip_cut_off_in_its_header_is_invalid_request(
    whisper_runtime: WhisperRuntime, speech_clip: bytes
) -> None:
    with pytest.raises(LlmlbError) as caught:
        whisper_runtime.transcribe(TranscribeRequest("w", speech_clip[:40], "cut.wav"))
    assert caught.value.code is ErrorCode.INVALID_REQUEST


def test_real_transcript_renders_as_srt_vtt_text_and_verbose_json(
    whisper_runtime: WhisperRuntime, speech_clip: bytes
) -> None:
    transcript = whisper_runtime.transcribe(TranscribeRequest("w", speech_clip))
    srt, srt_type = render(transcript, ResponseFormat.SRT)
    assert (
        srt.startswith("1\n00:00:00,000 --> 00:00:0")
        and "fox" in srt
        and srt_type.startswith("application/x-subrip")
    )
    vtt, _ = render(transcript, ResponseFormat.VTT)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and "fox" in vtt
    text, _ = render(transcript, ResponseFormat.TEXT)
    assert text == transcript.text + "\n"
    verbose, _ = render(transcript, ResponseFormat.VERBOSE_JSON)
    assert '"language": "en"' in verbose and '"segments": [{"id": 0' in verbose


# espeak-ng says this clearly at 130 to 175 words a minute; "the weather is cold and windy this morning"
# was heard as "but wherever is cold..." at 150.
ESPEAK_SENTENCE = "Please open the door and turn on the light."


def test_whisper_transcribes_a_clip_that_espeak_ng_spoke(whisper_runtime: WhisperRuntime) -> None:
    voice = espeak()
    clip = voice.wav(ESPEAK_SENTENCE, voice="en-us")
    rate, samples = read_wav(clip)
    assert rate == voice.sample_rate == 22050
    assert 1.5 < len(samples) / rate < 6.0
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
    assert rms > 500  # speech, not silence (full scale is 32767)

    transcript = whisper_runtime.transcribe(TranscribeRequest("whisper-base", clip, "espeak.wav"))
    assert_heard(transcript.text, ESPEAK_SENTENCE)
    assert transcript.language == "en"


def test_whisper_detects_the_language_it_hears(whisper_runtime: WhisperRuntime) -> None:
    spanish = "Buenos días. Hoy hace muy buen tiempo en la ciudad."
    clip = espeak().wav(spanish, voice="es")
    transcript = whisper_runtime.transcribe(TranscribeRequest("whisper-base", clip, "espeak-es.wav"))
    assert transcript.language == "es"  # no language given: whisper found it
    assert_heard(transcript.text, spanish)


@pytest.mark.parametrize(
    ("required", "outcome"), [(True, pytest.fail.Exception), (False, pytest.skip.Exception)]
)
def test_a_missing_espeak_library_fails_when_models_are_required_and_skips_otherwise(
    required: bool, outcome: type[BaseException]
) -> None:
    with pytest.raises(outcome, match="espeak-ng is not available: no_such_espeakng_loader is not installed"):
        open_espeak("no_such_espeakng_loader", required=required)


def test_voice_names_a_voice_config_does_not_list_are_ignored_or_refused(
    piper: ModelFiles, tmp_path: Path
) -> None:
    """OpenAI clients always send a voice ("alloy", ...): a single-speaker voice speaks regardless."""
    paths: dict[str, Path] = {}
    for filename, path in piper.paths.items():
        if filename.endswith(".json"):
            config = json.loads(path.read_text(encoding="utf-8"))
            config.pop("speaker_id_map", None)  # as in voice configs that leave it out altogether
            copy = tmp_path / path.name
            copy.write_text(json.dumps(config), encoding="utf-8")
        else:
            copy = tmp_path / path.name
            copy.symlink_to(path)
        paths[filename] = copy
    runtime = PiperRuntime(LoadContext(piper.model, paths, RuntimeSettings(threads=os.cpu_count() or 1)))
    runtime.load()
    try:
        request = SpeakRequest("piper", "Hello there.", voice="alloy", format=AudioFormat.WAV)
        rate, samples = read_wav(b"".join(c.data for c in runtime.speak(request, threading.Event())))
        assert rate == 22050 and float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) > 500
    finally:
        runtime.unload()


def test_an_unknown_voice_of_a_multi_speaker_config_is_invalid(
    piper_runtime: PiperRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    speakers = {"amy": 0, "joe": 1}
    monkeypatch.setattr(piper_runtime, "_config", {**piper_runtime._config, "speaker_id_map": speakers})
    with pytest.raises(LlmlbError) as caught:
        list(piper_runtime.speak(SpeakRequest("piper", "Hi.", voice="alloy"), threading.Event()))
    assert caught.value.code is ErrorCode.INVALID_REQUEST and "amy, joe" in caught.value.message
