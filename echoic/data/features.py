"""Log-mel filterbank features (kaldi-native-fbank) and global CMVN statistics.

Features are Kaldi-compatible: samples are scaled to the int16 range before the
filterbank, frames are snipped at the edges, and kaldi-native-fbank does the
work. Its own dither is always off: its random numbers do not come from
(seed, epoch, utterance id), so echoic adds dither itself from a given generator.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import kaldi_native_fbank as knf
import numpy as np

from echoic.errors import EchoicError

INT16_SCALE = 32768.0
# Variances below this floor (a constant feature bin) would blow up 1/std.
_VARIANCE_FLOOR = 1e-8


@dataclass(frozen=True)
class FbankConfig:
    num_mel_bins: int = 80  # output dimension of the features
    frame_length_ms: float = 25.0  # analysis window
    frame_shift_ms: float = 10.0  # hop between frames
    dither: float = (
        0.0  # std of Gaussian noise added in int16 units (0 = off), seeded per utterance
    )

    def __post_init__(self) -> None:
        if self.num_mel_bins < 1:
            raise ValueError("num_mel_bins must be positive")
        if not 0 < self.frame_shift_ms <= self.frame_length_ms:
            raise ValueError("need 0 < frame_shift_ms <= frame_length_ms")
        if self.dither < 0:
            raise ValueError("dither must not be negative")

    def window_samples(self, sample_rate: int) -> int:
        return int(sample_rate * self.frame_length_ms / 1000)

    def shift_samples(self, sample_rate: int) -> int:
        return int(sample_rate * self.frame_shift_ms / 1000)

    def num_frames(self, num_samples: int, sample_rate: int) -> int:
        """Frames Kaldi produces for `num_samples` (snip_edges: whole windows only)."""
        window = self.window_samples(sample_rate)
        if num_samples < window:
            return 0
        return 1 + (num_samples - window) // self.shift_samples(sample_rate)


def compute_fbank(
    samples: np.ndarray,
    sample_rate: int,
    config: FbankConfig,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Log-mel fbank of float samples in [-1, 1]. Shape: (frames, num_mel_bins) float32."""
    scaled = np.asarray(samples, dtype=np.float32) * INT16_SCALE
    if config.dither > 0:
        if rng is None:
            raise ValueError("dither needs a generator so that it is reproducible")
        scaled = scaled + rng.standard_normal(scaled.shape[0], dtype=np.float32) * config.dither
    options = knf.FbankOptions()
    options.frame_opts.samp_freq = sample_rate
    options.frame_opts.frame_length_ms = config.frame_length_ms
    options.frame_opts.frame_shift_ms = config.frame_shift_ms
    options.frame_opts.dither = 0.0
    options.frame_opts.snip_edges = True
    options.mel_opts.num_bins = config.num_mel_bins
    fbank = knf.OnlineFbank(options)
    fbank.accept_waveform(sample_rate, scaled)
    fbank.input_finished()
    count = fbank.num_frames_ready
    if count == 0:
        return np.zeros((0, config.num_mel_bins), dtype=np.float32)
    return np.stack([fbank.get_frame(i) for i in range(count)]).astype(np.float32, copy=False)


@dataclass(frozen=True)
class InputSpec:
    """What the data pipeline must produce for a model: fbank with these options, or the
    raw waveform, at `sample_rate`. Models report it (their frontend's `input_spec`)."""

    kind: Literal["fbank", "waveform"]
    sample_rate: int = 16000
    fbank: FbankConfig | None = None

    def __post_init__(self) -> None:
        if (self.kind == "fbank") != (self.fbank is not None):
            raise ValueError("an fbank input spec needs fbank options, a waveform one none")

    @property
    def frames_per_second(self) -> float:
        """Unit of `max_frames` in batching: feature frames, or 10 ms of waveform."""
        return 1000.0 / self.fbank.frame_shift_ms if self.fbank else 100.0

    def seconds_for_frames(self, frames: int) -> float:
        """The shortest audio that gives `frames` frames: fbank needs a whole window for
        its first frame (snip_edges), a waveform frame is 1 / frames_per_second."""
        if self.fbank is None:
            return frames / self.frames_per_second
        window, shift = (
            self.fbank.window_samples(self.sample_rate),
            self.fbank.shift_samples(self.sample_rate),
        )
        return (window + (frames - 1) * shift) / self.sample_rate


FBANK_80 = InputSpec("fbank", 16000, FbankConfig())  # the default: 80-dim fbank at 16 kHz


@dataclass
class CmvnStats:
    """Global mean/variance statistics as exact sums (merge-able across workers and files).

    `sum` and `sum_sq` are float64 per-bin sums over `count` frames.
    """

    sum: np.ndarray
    sum_sq: np.ndarray
    count: int
    sample_rate: int
    fbank: FbankConfig

    @classmethod
    def empty(cls, sample_rate: int, fbank: FbankConfig) -> CmvnStats:
        dim = fbank.num_mel_bins
        return cls(np.zeros(dim), np.zeros(dim), 0, sample_rate, fbank)

    def add(self, feats: np.ndarray) -> None:
        """Accumulate a (frames, dim) feature matrix."""
        feats64 = feats.astype(np.float64)
        self.sum += feats64.sum(axis=0)
        self.sum_sq += np.square(feats64).sum(axis=0)
        self.count += feats.shape[0]

    def merge(self, other: CmvnStats) -> None:
        self.sum += other.sum
        self.sum_sq += other.sum_sq
        self.count += other.count

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def std(self) -> np.ndarray:
        variance = self.sum_sq / max(self.count, 1) - np.square(self.mean)
        return np.sqrt(np.maximum(variance, _VARIANCE_FLOOR))

    def normalize(self, feats: np.ndarray) -> np.ndarray:
        """(feats - mean) / std, float32."""
        return ((feats - self.mean) / self.std).astype(np.float32)

    def save(self, path: str | Path) -> None:
        record = {
            "count": self.count,
            "sample_rate": self.sample_rate,
            "fbank": asdict(self.fbank),
            "sum": self.sum.tolist(),
            "sum_sq": self.sum_sq.tolist(),
        }
        Path(path).write_text(json.dumps(record, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CmvnStats:
        path = Path(path)
        if not path.is_file():
            raise EchoicError(f"CMVN statistics not found: {path}")
        try:
            record = json.loads(path.read_text())
            stats = cls(
                sum=np.asarray(record["sum"], dtype=np.float64),
                sum_sq=np.asarray(record["sum_sq"], dtype=np.float64),
                count=int(record["count"]),
                sample_rate=int(record["sample_rate"]),
                fbank=FbankConfig(**record["fbank"]),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise EchoicError(f"{path}: not a CMVN statistics file ({error})") from None
        if stats.sum.shape != stats.sum_sq.shape or stats.sum.shape[0] != stats.fbank.num_mel_bins:
            raise EchoicError(f"{path}: statistics do not match num_mel_bins")
        if stats.count <= 0 or not math.isfinite(float(stats.sum.sum())):
            raise EchoicError(f"{path}: statistics are empty or not finite")
        return stats
