"""Data augmentation: speed perturbation (waveform) and SpecAugment (features).

Each function takes an explicit numpy generator; the dataset derives it from
(seed, epoch, utterance id), so augmentation is identical whatever the worker
count or resume point. Everything is numpy so no thread pool can change results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echoic.data.audio import resample


@dataclass(frozen=True)
class SpecAugmentConfig:
    num_freq_masks: int = 2  # frequency bands masked per utterance
    max_freq_width: int = 10  # widest band, in mel bins
    num_time_masks: int = 2  # time spans masked per utterance
    max_time_width: int = 50  # longest span, in frames
    max_time_ratio: float = 0.2  # a span never covers more than this fraction of the utterance
    time_warp: int = 0  # largest warp distance in frames (the paper's W); 0 turns warping off

    def __post_init__(self) -> None:
        if min(self.num_freq_masks, self.max_freq_width, self.num_time_masks) < 0:
            raise ValueError("mask counts and widths must not be negative")
        if min(self.max_time_width, self.time_warp) < 0:
            raise ValueError("max_time_width and time_warp must not be negative")
        if not 0 <= self.max_time_ratio <= 1:
            raise ValueError("max_time_ratio must be within [0, 1]")


def speed_perturb(samples: np.ndarray, sample_rate: int, factor: float) -> np.ndarray:
    """Play `samples` `factor` times faster (pitch and tempo change together, like sox `speed`).

    The output has about len(samples) / factor samples at the same rate.
    """
    if factor == 1.0:
        return samples
    return resample(samples, sample_rate * factor, sample_rate)


def spec_augment(
    feats: np.ndarray, config: SpecAugmentConfig, rng: np.random.Generator
) -> np.ndarray:
    """Optional time warp, then frequency and time masks. Shape kept: (frames, bins).

    Masked cells take the time-average of their bin, so a mask carries no
    time-varying information but stays in the features' normal range (a zero fill
    would be a loud outlier in raw log-mel space, before CMVN).
    """
    out = np.array(feats, dtype=np.float32, copy=True)
    frames, bins = out.shape
    if frames == 0:
        return out
    if config.time_warp > 0:
        out = time_warp(out, config.time_warp, rng)
    fill = out.mean(axis=0)
    for _ in range(config.num_freq_masks):
        width = int(rng.integers(0, min(config.max_freq_width, bins) + 1))
        start = int(rng.integers(0, bins - width + 1))
        out[:, start : start + width] = fill[start : start + width]
    longest = min(config.max_time_width, int(frames * config.max_time_ratio))
    for _ in range(config.num_time_masks):
        width = int(rng.integers(0, longest + 1))
        start = int(rng.integers(0, frames - width + 1))
        out[start : start + width] = fill
    return out


def time_warp(feats: np.ndarray, max_warp: int, rng: np.random.Generator) -> np.ndarray:
    """Move a random time point by up to `max_warp` frames, stretching the two sides linearly.

    Utterances too short for the warp window (frames <= 2 * max_warp) are returned unchanged.
    """
    frames = feats.shape[0]
    if frames <= 2 * max_warp:
        return feats
    center = int(rng.integers(max_warp, frames - max_warp))
    moved = int(np.clip(center + rng.integers(-max_warp, max_warp + 1), 1, frames - 1))
    left = _resize_time(feats[:center], moved)
    right = _resize_time(feats[center:], frames - moved)
    return np.concatenate([left, right], axis=0)


def _resize_time(feats: np.ndarray, length: int) -> np.ndarray:
    """Linear interpolation of a (frames, bins) matrix to `length` frames (centres aligned)."""
    frames = feats.shape[0]
    if length == frames:
        return feats
    positions = (np.arange(length) + 0.5) * (frames / length) - 0.5
    positions = np.clip(positions, 0, frames - 1)
    low = np.floor(positions).astype(np.int64)
    high = np.minimum(low + 1, frames - 1)
    weight = (positions - low).astype(np.float32)[:, None]
    return feats[low] * (1 - weight) + feats[high] * weight
