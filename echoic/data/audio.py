"""Audio reading: soundfile for decoding (wav, flac, ogg, mp3), soxr for resampling.

Every failure is an `AudioError` whose `reason` is one of the short categories
below, so the data pipeline can count skips by cause.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from echoic.errors import AudioError

MISSING = "missing_audio"
UNREADABLE = "unreadable_audio"
EMPTY = "empty_audio"
TRUNCATED = "truncated_audio"
NONFINITE = "nonfinite_audio"

# Audio shorter than expected by more than this is truncated (a half-copied file, say);
# the slack absorbs durations that other tools rounded.
_TRUNCATION_SLACK_S = 0.05
_TRUNCATION_SLACK_FRACTION = 0.01


@dataclass(frozen=True)
class AudioInfo:
    duration: float  # seconds
    sample_rate: int
    channels: int


def audio_info(path: str) -> AudioInfo:
    """Duration, rate and channel count from the file header."""
    if not os.path.exists(path):
        raise AudioError(MISSING, f"audio file not found: {path}")
    try:
        info = sf.info(path)
    except (RuntimeError, ValueError, OSError, TypeError) as error:
        raise AudioError(UNREADABLE, f"cannot read audio {path}: {_short(error)}") from None
    return AudioInfo(
        duration=info.frames / info.samplerate, sample_rate=info.samplerate, channels=info.channels
    )


def load_audio(
    path: str, *, sample_rate: int, offset: float = 0.0, duration: float | None = None
) -> np.ndarray:
    """Read `duration` seconds from `offset` (all of it when None) as float32 mono.

    Channels are averaged; the rate is converted with soxr (never by linear
    interpolation). Shape: (samples,).
    """
    if not os.path.exists(path):
        raise AudioError(MISSING, f"audio file not found: {path}")
    try:
        with sf.SoundFile(path) as stream:
            native_rate = stream.samplerate
            start = round(offset * native_rate)
            wanted = -1 if duration is None else round(duration * native_rate)
            if start:
                if start >= stream.frames:
                    raise AudioError(
                        TRUNCATED,
                        f"{path}: offset {offset:.2f} s is past the end "
                        f"({stream.frames / native_rate:.2f} s)",
                    )
                stream.seek(start)
            data = stream.read(wanted, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (RuntimeError, ValueError, OSError, TypeError, EOFError) as error:
        raise AudioError(UNREADABLE, f"cannot read audio {path}: {_short(error)}") from None
    if data.shape[0] == 0:
        raise AudioError(EMPTY, f"{path}: no audio samples")
    if duration is not None:
        got = data.shape[0] / native_rate
        if got < duration - max(_TRUNCATION_SLACK_S, _TRUNCATION_SLACK_FRACTION * duration):
            raise AudioError(
                TRUNCATED, f"{path}: {got:.2f} s of audio where {duration:.2f} s were expected"
            )
    samples = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(samples).all():
        raise AudioError(NONFINITE, f"{path}: audio contains NaN or infinite samples")
    return resample(samples, native_rate, sample_rate)


def resample(samples: np.ndarray, from_rate: float, to_rate: float) -> np.ndarray:
    """Band-limited resampling with soxr (high quality). Shape: (samples,) float32."""
    if from_rate == to_rate:
        return np.ascontiguousarray(samples, dtype=np.float32)
    out = soxr.resample(np.ascontiguousarray(samples, dtype=np.float32), from_rate, to_rate, "HQ")
    return out.astype(np.float32, copy=False)


def _short(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
