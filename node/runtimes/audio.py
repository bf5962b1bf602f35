"""PCM helpers for speech output: float samples to 16-bit PCM, and the WAV header of a stream."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

# RIFF sizes for a stream whose length is unknown when the header goes out; decoders read to the end.
UNKNOWN_SIZE = 0xFFFFFFFF


def to_pcm16(samples: Any) -> bytes:
    """Little-endian signed 16-bit PCM from float samples in -1..1 (clipped)."""
    clipped = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    return (clipped * 32767.0).astype("<i2").tobytes()


def wav_header(
    sample_rate: int, channels: int = 1, sample_width: int = 2, data_bytes: int | None = None
) -> bytes:
    """A 44-byte RIFF/WAVE header; ``data_bytes=None`` marks a stream of unknown length."""
    data_size = UNKNOWN_SIZE if data_bytes is None else data_bytes
    riff_size = UNKNOWN_SIZE if data_bytes is None else 36 + data_bytes
    block_align = channels * sample_width
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVEfmt "
        + struct.pack(
            "<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block_align, block_align, 8 * sample_width
        )
        + b"data"
        + struct.pack("<I", data_size)
    )
