"""Data augmentation: speed perturbation (waveform) and SpecAugment (features).

Each function takes an explicit numpy generator; the dataset derives it from
(seed, epoch, utterance id), so augmentation is identical whatever the worker
count or resume point. Everything is numpy so no thread pool can change results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


# -- waveform augmentation: reverberation, additive noise, telephone channel, gain ---------
#
# The transforms below are pure functions of their inputs and an explicit generator. The
# dataset draws that generator from (seed, epoch, utterance id) or, with `copies`, from
# (seed, copy, utterance id), so an augmented batch is the same with any worker count and
# after a resume. The noise and impulse-response sources (echoic.data.noise) are built
# once per run, before any worker forks, and never change during it.


@dataclass(frozen=True)
class NoiseConfig:
    """Additive noise at an SNR drawn uniformly from `snr_db`. The kind of noise is drawn
    with the relative weights below; a weight of 0 (or `files` empty) leaves a kind out."""

    prob: float = 0.5  # share of utterances that get noise
    snr_db: list[float] = field(default_factory=lambda: [0.0, 20.0])  # [low, high]
    colored: float = 1.0  # generated white, pink or brown noise
    babble: float = 1.0  # 3-6 other training utterances mixed together
    files: list[str] = field(default_factory=list)  # folders or manifests of noise recordings
    files_weight: float = 1.0  # weight of a segment of one of `files`

    def __post_init__(self) -> None:
        _check_prob("noise.prob", self.prob)
        _check_range("noise.snr_db", self.snr_db, allow_negative=True)
        if min(self.colored, self.babble, self.files_weight) < 0:
            raise ValueError("noise weights must not be negative")
        if self.colored + self.babble + (self.files_weight if self.files else 0) <= 0:
            raise ValueError("noise needs a positive weight on colored, babble or files")


@dataclass(frozen=True)
class ReverbConfig:
    """Convolution with a room impulse response: from a folder or manifest of RIR
    recordings, or from a bank of shoebox rooms simulated once with pyroomacoustics and
    cached (see echoic.data.noise.simulated_rirs)."""

    prob: float = 0.2
    rirs: str = "simulated"  # "simulated", or a folder or manifest of impulse responses
    num_simulated: int = 100  # rooms in the simulated bank (~0.3 s each to simulate, once)
    rt60: list[float] = field(default_factory=lambda: [0.2, 0.8])  # simulated rooms' RT60, s

    def __post_init__(self) -> None:
        _check_prob("reverb.prob", self.prob)
        _check_range("reverb.rt60", self.rt60)
        if self.num_simulated < 1:
            raise ValueError("reverb.num_simulated must be at least 1")


@dataclass(frozen=True)
class ChannelConfig:
    """A telephone channel: band-pass from a low edge drawn from `low_hz` to a high edge
    drawn from `high_hz`, through 8 kHz, and with `mulaw_prob` through 8-bit mu-law."""

    prob: float = 0.2
    low_hz: list[float] = field(default_factory=lambda: [200.0, 400.0])
    high_hz: list[float] = field(default_factory=lambda: [3000.0, 3700.0])
    mulaw_prob: float = 0.5

    def __post_init__(self) -> None:
        _check_prob("channel.prob", self.prob)
        _check_prob("channel.mulaw_prob", self.mulaw_prob)
        _check_range("channel.low_hz", self.low_hz)
        _check_range("channel.high_hz", self.high_hz)
        if not (self.low_hz[0] > 0 and self.low_hz[1] < self.high_hz[0]) or (
            self.high_hz[1] >= TELEPHONE_RATE / 2
        ):
            raise ValueError(f"channel needs 0 < low_hz < high_hz < {TELEPHONE_RATE // 2} Hz")


@dataclass(frozen=True)
class WaveformAugmentConfig:
    """Waveform augmentation before features, in this order: reverberation, noise,
    channel, gain. Each part is off when null."""

    # A fixed number of augmented versions per utterance: each epoch uses one, drawn from
    # (seed, epoch, id), so `feature_cache` can keep them (copies x the clean cache's
    # memory). null: a fresh draw every epoch (no feature cache).
    copies: int | None = None
    reverb: ReverbConfig | None = None
    noise: NoiseConfig | None = None
    channel: ChannelConfig | None = None
    gain_db: list[float] | None = None  # e.g. [-6, 6]: every utterance's level moves by this

    def __post_init__(self) -> None:
        if self.copies is not None and self.copies < 1:
            raise ValueError("augment.copies must be at least 1 (or null)")
        if self.gain_db is not None:
            _check_range("augment.gain_db", self.gain_db, allow_negative=True)


TELEPHONE_RATE = 8000


def _check_prob(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be within [0, 1]")


def _check_range(name: str, values: list[float], allow_negative: bool = False) -> None:
    if len(values) != 2 or values[0] > values[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high")
    if not allow_negative and values[0] < 0:
        raise ValueError(f"{name} must not be negative")


def power(samples: np.ndarray) -> float:
    """Mean square, in float64 (float32 sums lose digits over a minute of audio)."""
    return float(np.mean(np.square(samples, dtype=np.float64))) if samples.size else 0.0


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """speech + noise scaled so that power(speech) / power(scaled noise) is `snr_db`.
    `noise` must be as long as `speech`. Silent speech or noise is returned unchanged."""
    speech_power, noise_power = power(speech), power(noise)
    if speech_power == 0 or noise_power == 0:
        return speech
    scale = np.sqrt(speech_power / (noise_power * 10 ** (snr_db / 10)))
    return (speech.astype(np.float64) + noise * scale).astype(np.float32)


def colored_noise(length: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    """White, pink (1/f power) or brown (1/f^2 power) Gaussian noise, float64. Shaped in
    the frequency domain at a fast FFT length (a length with a large prime factor can be
    10x slower), then cut to `length`."""
    from scipy.fft import irfft, next_fast_len, rfft, rfftfreq

    size = next_fast_len(length, real=True) if length >= 2 else length
    white = rng.standard_normal(size)
    if colour == "white" or length < 2:
        return white[:length]
    spectrum = rfft(white)
    freqs = rfftfreq(size)
    freqs[0] = freqs[1]
    spectrum /= np.sqrt(freqs) if colour == "pink" else freqs
    return irfft(spectrum, n=size)[:length]


def reverberate(samples: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve with a room impulse response, keeping the length, the alignment and the
    power: the output starts at the response's direct path (`direct_path`), so
    reverberation adds a tail but never delays the speech against its frames."""
    from scipy.signal import fftconvolve

    if samples.size == 0 or rir.size == 0:
        return samples
    direct = direct_path(rir)
    wet = fftconvolve(samples.astype(np.float64), rir.astype(np.float64))
    wet = wet[direct : direct + samples.shape[0]]
    wet_power = power(wet)
    if wet_power == 0:
        return samples
    return (wet * np.sqrt(power(samples) / wet_power)).astype(np.float32)


def direct_path(rir: np.ndarray) -> int:
    """Index of a response's direct path: its first arrival of at least half the largest
    magnitude (a later sum of coincident reflections can be larger than the direct sound),
    at the top of that arrival's peak."""
    magnitude = np.abs(rir)
    first = int(np.argmax(magnitude >= 0.5 * magnitude.max()))
    return first + int(np.argmax(magnitude[first : first + 8]))


def telephone(
    samples: np.ndarray,
    sample_rate: int,
    low_hz: float = 300.0,
    high_hz: float = 3400.0,
    mulaw: bool = True,
) -> np.ndarray:
    """A telephone channel: zero-phase band-pass (4th-order Butterworth, so no delay),
    down to 8 kHz and back, and optionally 8-bit mu-law (G.711's companding)."""
    from scipy.signal import butter, sosfiltfilt

    if samples.shape[0] < 64:  # too short for the filter's edges
        return samples
    sos = butter(4, [low_hz, high_hz], btype="bandpass", fs=sample_rate, output="sos")
    band = sosfiltfilt(sos, samples.astype(np.float64))
    narrow = resample(band, sample_rate, TELEPHONE_RATE)
    if mulaw:
        narrow = mu_law(narrow)
    out = resample(narrow, TELEPHONE_RATE, sample_rate)
    # The two resamplings may differ from the input length by a sample: keep it exact.
    if out.shape[0] < samples.shape[0]:
        out = np.pad(out, (0, samples.shape[0] - out.shape[0]))
    return out[: samples.shape[0]].astype(np.float32)


def mu_law(samples: np.ndarray, levels: int = 256) -> np.ndarray:
    """Encode to `levels` mu-law steps and decode again (values clipped to [-1, 1])."""
    mu = levels - 1
    clipped = np.clip(samples, -1.0, 1.0)
    encoded = np.sign(clipped) * np.log1p(mu * np.abs(clipped)) / np.log1p(mu)
    steps = np.round((encoded + 1) / 2 * mu)
    decoded = steps / mu * 2 - 1
    return (np.sign(decoded) * np.expm1(np.abs(decoded) * np.log1p(mu)) / mu).astype(np.float32)
