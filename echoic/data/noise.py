"""Sources for waveform augmentation: noise (generated, babble, recordings) and room
impulse responses (recordings, or rooms simulated with pyroomacoustics and cached).

Sources are built once per run, in the training process before any worker forks, from
the config and the training manifest only; after that every draw is a pure function of
the generator the dataset passes in. A noise or impulse-response file that cannot be
read, or is empty, is left out and counted (logged once when the source is built); a
file that fails later, when a segment is read, leaves that utterance without noise and
is counted in the pass summary.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from echoic.data import audio as audio_io
from echoic.data.augment import (
    NoiseConfig,
    ReverbConfig,
    WaveformAugmentConfig,
    colored_noise,
    direct_path,
    mix_at_snr,
    power,
    reverberate,
    telephone,
)
from echoic.data.importers import AUDIO_SUFFIXES
from echoic.data.manifest import Manifest, read_manifest
from echoic.errors import AudioError, EchoicError
from echoic.seeding import make_rng

log = logging.getLogger(__name__)

COLOURS = ("white", "pink", "brown")
BABBLE_TALKERS = (3, 6)  # other utterances mixed into one babble noise, inclusive
BABBLE_POOL = 200  # training utterances kept in memory for babble (~40 MB at 3 s each)
RIR_MAX_SECONDS = 1.0  # simulated responses are cut 1 s after the direct path
SIMULATED_RIR_SEED = 0  # the bank is data, the same for every run: not the run's seed


@dataclass
class SourceReport:
    """What building a source left out: reason -> count, and one example message each."""

    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, error: AudioError) -> None:
        self.skipped[error.reason] += 1
        self.examples.setdefault(error.reason, str(error))

    def summary(self) -> str:
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        first = next(iter(self.examples.values()), "")
        return f"skipped {sum(self.skipped.values())} ({parts}); first: {first}"


@dataclass(frozen=True)
class NoiseFile:
    path: str
    frames: int
    sample_rate: int


def audio_files(location: str | Path) -> list[str]:
    """A folder's audio files (recursively, sorted), or a manifest's audio paths."""
    location = Path(location)
    if location.is_dir():
        return sorted(str(p) for p in location.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if location.is_file() and location.suffix == ".jsonl":
        return [u.audio for u in read_manifest(location).utterances]
    raise EchoicError(f"noise or impulse-response source not found: {location}")


def scan_noise_files(locations: list[str], report: SourceReport) -> list[NoiseFile]:
    """Headers of every noise file; unreadable and empty ones are left out and counted."""
    files = []
    for location in locations:
        for path in audio_files(location):
            try:
                info = audio_io.audio_info(path)
                frames = round(info.duration * info.sample_rate)
                if frames == 0:
                    raise AudioError(audio_io.EMPTY, f"{path}: no audio samples")
            except AudioError as error:
                report.add(error)
                continue
            files.append(NoiseFile(path, frames, info.sample_rate))
    return files


def loop_segment(clip: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` samples of `clip` from a random start, repeating it when it is shorter."""
    if clip.shape[0] >= length:
        start = int(rng.integers(0, clip.shape[0] - length + 1))
        return clip[start : start + length]
    start = int(rng.integers(0, clip.shape[0]))
    repeats = math.ceil((length + start) / clip.shape[0])
    return np.tile(clip, repeats)[start : start + length]


def babble(length: int, pool: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """3-6 utterances of `pool`, each from a random start (looped) and equally loud, summed."""
    talkers = int(rng.integers(BABBLE_TALKERS[0], BABBLE_TALKERS[1] + 1))
    mixed = np.zeros(length)
    for _ in range(talkers):
        segment = loop_segment(pool[int(rng.integers(len(pool)))], length, rng)
        mixed += segment / math.sqrt(power(segment) or 1.0)
    return mixed


class NoiseBank:
    """Draws a noise signal of a given length: generated coloured noise, babble from
    training utterances, or a segment of a noise recording, with the config's weights."""

    def __init__(
        self,
        config: NoiseConfig,
        sample_rate: int,
        babble_pool: list[np.ndarray],
        files: list[NoiseFile],
    ) -> None:
        self.config = config
        self.sample_rate = sample_rate
        self.babble_pool = babble_pool
        self.files = files
        weights = {
            "colored": config.colored,
            "babble": config.babble if babble_pool else 0.0,
            "files": config.files_weight if files else 0.0,
        }
        self.kinds = [kind for kind, weight in weights.items() if weight > 0]
        if not self.kinds:
            raise EchoicError("noise augmentation has no usable source (all files skipped?)")
        total = sum(weights[k] for k in self.kinds)
        self.probabilities = [weights[k] / total for k in self.kinds]

    def draw(self, length: int, rng: np.random.Generator) -> np.ndarray:
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.probabilities))]
        if kind == "colored":
            return colored_noise(length, COLOURS[int(rng.integers(len(COLOURS)))], rng)
        if kind == "babble":
            return babble(length, self.babble_pool, rng)
        return self._file_segment(length, rng)

    def _file_segment(self, length: int, rng: np.random.Generator) -> np.ndarray:
        noise = self.files[int(rng.integers(len(self.files)))]
        wanted = math.ceil(length * noise.sample_rate / self.sample_rate)
        start = int(rng.integers(0, max(1, noise.frames - wanted + 1)))
        try:
            data, _ = sf.read(
                noise.path, start=start, frames=wanted, dtype="float32", always_2d=True
            )
        except (RuntimeError, ValueError, OSError, TypeError, EOFError) as error:
            raise AudioError(
                audio_io.UNREADABLE, f"cannot read noise {noise.path}: {error}"
            ) from None
        if data.shape[0] == 0 or not np.isfinite(data).all():
            raise AudioError(audio_io.EMPTY, f"{noise.path}: no usable noise samples")
        samples = audio_io.resample(data.mean(axis=1), noise.sample_rate, self.sample_rate)
        return loop_segment(samples, length, rng)


def babble_pool(
    manifest: Manifest, sample_rate: int, seed: int, report: SourceReport, size: int = BABBLE_POOL
) -> list[np.ndarray]:
    """`size` training utterances drawn from (seed), loaded once, for babble noise."""
    count = min(size, len(manifest.utterances))
    chosen = make_rng(seed, "babble-pool").choice(len(manifest.utterances), count, replace=False)
    pool = []
    for index in sorted(int(i) for i in chosen):
        utterance = manifest.utterances[index]
        try:
            pool.append(
                audio_io.load_audio(
                    utterance.audio,
                    sample_rate=sample_rate,
                    offset=utterance.offset,
                    duration=utterance.duration,
                )
            )
        except AudioError as error:
            report.add(error)
    return pool


def rir_recordings(location: str, sample_rate: int, report: SourceReport) -> list[np.ndarray]:
    rirs = []
    for path in audio_files(location):
        try:
            rir = audio_io.load_audio(path, sample_rate=sample_rate)
            if not np.any(rir):
                raise AudioError(audio_io.EMPTY, f"{path}: impulse response is all zeros")
        except AudioError as error:
            report.add(error)
            continue
        rirs.append(rir)
    return rirs


def cache_dir() -> Path:
    """Where built sources are cached: $ECHOIC_CACHE, or ~/.cache/echoic."""
    return Path(os.environ.get("ECHOIC_CACHE") or Path.home() / ".cache" / "echoic")


def simulated_rirs(config: ReverbConfig, sample_rate: int) -> list[np.ndarray]:
    """Shoebox rooms simulated with pyroomacoustics' image-source method (random size,
    RT60 from `config.rt60`, source and microphone at least 0.5 m from the walls), made
    once and cached as .npz under `cache_dir()`."""
    low, high = config.rt60
    name = f"rirs-{config.num_simulated}-rt{low:g}-{high:g}-{sample_rate}-v1.npz"
    path = cache_dir() / name
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            lengths, flat = stored["lengths"], stored["samples"]
        return np.split(flat, np.cumsum(lengths)[:-1])
    import pyroomacoustics as pra

    rng = make_rng(SIMULATED_RIR_SEED, "rooms", sample_rate)
    rirs = []
    for _ in range(config.num_simulated):
        dims = rng.uniform([3.0, 3.0, 2.4], [10.0, 8.0, 4.0])
        rt60 = rng.uniform(low, high)
        absorption, max_order = pra.inverse_sabine(rt60, dims)
        room = pra.ShoeBox(
            dims, fs=sample_rate, materials=pra.Material(absorption), max_order=max_order
        )
        room.add_source(rng.uniform(0.5, dims - 0.5))
        room.add_microphone(rng.uniform(0.5, dims - 0.5))
        room.compute_rir()
        rir = np.asarray(room.rir[0][0], dtype=np.float32)
        direct = direct_path(rir)
        rirs.append(rir[: direct + int(RIR_MAX_SECONDS * sample_rate)])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(partial, lengths=np.array([len(r) for r in rirs]), samples=np.concatenate(rirs))
    os.replace(partial, path)
    return rirs


class WaveformAugmenter:
    """Applies a `WaveformAugmentConfig`: reverberation, noise, telephone channel, gain."""

    def __init__(
        self,
        config: WaveformAugmentConfig,
        sample_rate: int,
        noise: NoiseBank | None,
        rirs: list[np.ndarray] | None,
    ) -> None:
        self.config = config
        self.sample_rate = sample_rate
        self.noise = noise
        self.rirs = rirs

    def __call__(
        self, samples: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, list[AudioError]]:
        """The augmented samples (same length) and the noise reads that failed."""
        config, failures = self.config, []
        if config.reverb is not None and self.rirs and rng.random() < config.reverb.prob:
            samples = reverberate(samples, self.rirs[int(rng.integers(len(self.rirs)))])
        if config.noise is not None and self.noise is not None and rng.random() < config.noise.prob:
            snr = float(rng.uniform(*config.noise.snr_db))
            try:
                samples = mix_at_snr(samples, self.noise.draw(samples.shape[0], rng), snr)
            except AudioError as error:
                failures.append(error)
        if config.channel is not None and rng.random() < config.channel.prob:
            channel = config.channel
            samples = telephone(
                samples,
                self.sample_rate,
                low_hz=float(rng.uniform(*channel.low_hz)),
                high_hz=float(rng.uniform(*channel.high_hz)),
                mulaw=bool(rng.random() < channel.mulaw_prob),
            )
        if config.gain_db is not None:
            samples = samples * np.float32(10 ** (rng.uniform(*config.gain_db) / 20))
        return samples, failures


def build_augmenter(
    config: WaveformAugmentConfig, manifest: Manifest, sample_rate: int, seed: int
) -> WaveformAugmenter:
    """Build the sources `config` names, logging what they left out."""
    noise = rirs = None
    if config.noise is not None:
        report = SourceReport()
        files = scan_noise_files(config.noise.files, report)
        pool = babble_pool(manifest, sample_rate, seed, report) if config.noise.babble > 0 else []
        if report.skipped:
            log.warning("noise sources: %s", report.summary())
        noise = NoiseBank(config.noise, sample_rate, pool, files)
        log.info(
            "noise sources: %d files, %d utterances for babble, kinds %s",
            len(files),
            len(pool),
            ", ".join(noise.kinds),
        )
    if config.reverb is not None:
        report = SourceReport()
        if config.reverb.rirs == "simulated":
            rirs = simulated_rirs(config.reverb, sample_rate)
        else:
            rirs = rir_recordings(config.reverb.rirs, sample_rate, report)
        if report.skipped:
            log.warning("impulse responses: %s", report.summary())
        if not rirs:
            raise EchoicError(f"reverb: no usable impulse response in {config.reverb.rirs}")
        log.info("impulse responses: %d (%s)", len(rirs), config.reverb.rirs)
    return WaveformAugmenter(config, sample_rate, noise, rirs)
