"""From batch plans to padded tensors, with every bad utterance skipped and counted.

`AsrDataset[plan]` loads a whole batch (so one worker builds one batch and the
result cannot depend on how many workers there are). `BatchLoader` runs it
through a torch DataLoader, turns skip records into a per-pass summary, and
raises the one error the config asks to be fatal (missing audio, when
`on_missing_audio: error`) as a one-line message naming manifest file and line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from echoic.data import audio as audio_io
from echoic.data.augment import (
    SpecAugmentConfig,
    WaveformAugmentConfig,
    spec_augment,
    speed_perturb,
)
from echoic.data.batch import IGNORE_ID, Batch, Skip
from echoic.data.features import FBANK_80, FbankConfig, InputSpec, compute_fbank
from echoic.data.hotwords import HotwordSamplingConfig, sample_batch_hotwords
from echoic.data.manifest import Manifest
from echoic.data.noise import build_augmenter
from echoic.data.sampler import TOO_SHORT, BatchPlan, BucketBatchSampler
from echoic.data.tokenizer import Tokenizer
from echoic.data.workers import WorkerError, fork_map, ignore_stop_signals
from echoic.errors import AudioError, ManifestError
from echoic.seeding import make_rng

log = logging.getLogger(__name__)

EMPTY_TEXT = "empty_text"

FILL_CHUNK = 64  # utterances a feature-cache worker computes per message


@dataclass(frozen=True)
class DataConfig:
    """Batching and augmentation. What features to compute is not here: it comes from the
    model's frontend (`InputSpec`), so it is configured once."""

    speed_perturb: list[float] = field(default_factory=lambda: [1.0])  # e.g. [0.9, 1.0, 1.1]
    spec_augment: SpecAugmentConfig | None = SpecAugmentConfig()  # null turns it off
    max_frames: int | None = 12000  # padded frames per batch (batch size x longest utterance)
    batch_size: int | None = None  # fixed utterances per batch instead of max_frames
    max_batch_size: int | None = None  # cap on utterances per batch with max_frames
    num_buckets: int = 20  # duration buckets: more means less padding, less randomness
    min_duration: float = 0.1  # seconds; shorter utterances are skipped and counted
    max_duration: float = 30.0  # seconds; longer utterances are skipped and counted
    # data-loading processes (results do not depend on it); with feature_cache, the
    # processes that compute what the cache lacks at the start of each pass
    num_workers: int = 2
    on_missing_audio: Literal["skip", "error"] = "skip"  # a missing file is skipped or fatal
    # Keep each utterance's features (before SpecAugment; one copy per speed factor) in
    # memory after the first pass, so later epochs skip audio reading and fbank: about
    # 115 MB per hour of audio at 80 bins. Exact (batches equal the uncached ones), so
    # it needs features that are a pure function of the audio: no dither. The cache
    # lives in this process; num_workers processes fill it before each pass.
    feature_cache: bool = False
    # Training hotwords for contextual models (echoic.data.hotwords); null: none.
    hotwords: HotwordSamplingConfig | None = None
    # Reverberation, noise, telephone channel and gain on the waveform, before features
    # (echoic.data.augment.WaveformAugmentConfig); null: none. With feature_cache it
    # needs `copies`: the cache keeps that many augmented versions of each utterance.
    augment: WaveformAugmentConfig | None = None

    def __post_init__(self) -> None:
        if (self.max_frames is None) == (self.batch_size is None):
            raise ValueError("set exactly one of max_frames and batch_size")
        if not self.speed_perturb or min(self.speed_perturb) <= 0:
            raise ValueError("speed_perturb must list positive factors")
        if self.min_duration > self.max_duration:
            raise ValueError("min_duration is larger than max_duration")
        if self.num_workers < 0:
            raise ValueError("num_workers must not be negative")
        if self.feature_cache and self.augment is not None and self.augment.copies is None:
            raise ValueError(
                "feature_cache with augment needs augment.copies (how many augmented "
                "versions of each utterance to keep); without it every epoch's audio differs"
            )


class AsrDataset:
    """Loads, augments and collates the utterances of a `BatchPlan`.

    Augmentation draws come from (seed, epoch, utterance id, purpose) only.
    """

    def __init__(
        self,
        manifest: Manifest,
        tokenizer: Tokenizer | None,
        config: DataConfig,
        *,
        input_spec: InputSpec = FBANK_80,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.config = config
        self.input_spec = input_spec
        self.seed = seed
        self.augment = augment
        if config.feature_cache and input_spec.kind == "fbank" and input_spec.fbank.dither > 0:
            raise ValueError(
                "feature_cache needs fbank dither 0: dithered features differ per epoch"
            )
        # (utterance id, speed factor, augmented copy) -> (features or samples, seconds)
        self.cache: dict[tuple[str, float, int], tuple[np.ndarray, float]] | None = (
            {} if config.feature_cache else None
        )
        # Built here, before any worker forks, so every worker draws from the same sources.
        self.augmenter = (
            build_augmenter(config.augment, manifest, input_spec.sample_rate, seed)
            if augment and config.augment is not None
            else None
        )

    @property
    def cache_bytes(self) -> int:
        return sum(array.nbytes for array, _ in self.cache.values()) if self.cache else 0

    def __getitem__(self, plan: BatchPlan) -> Batch:
        items, skipped, unknown, failures = [], [], Counter(), []
        for index in plan.utterances:
            utterance = self.manifest.utterances[index]
            try:
                items.append(self._load(utterance, plan.epoch, unknown, failures))
            except AudioError as error:
                skipped.append(
                    Skip(utterance.id, error.reason, str(error), self.manifest.where(index))
                )
        batch = self._collate(plan, items, skipped, unknown)
        batch.augment_failures = failures
        return batch

    def _load(self, utterance, epoch: int, unknown: Counter, failures: list) -> dict:
        config, spec = self.config, self.input_spec
        tokens = None
        if self.tokenizer is not None:
            if not utterance.text.strip():
                raise AudioError(EMPTY_TEXT, "empty transcript")
            tokens = self.tokenizer.encode(utterance.text)
            unknown.update(self.tokenizer.unknown_chars(utterance.text))
        factor, copy, key = self._variant(utterance, epoch)
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            array, seconds = cached
        else:
            array, seconds, failed = self._features(utterance, epoch, factor, copy)
            failures += failed
            if self.cache is not None:
                array.setflags(write=False)  # shared by every later epoch: never edit in place
                self.cache[key] = (array, seconds)
        item = {"id": utterance.id, "text": utterance.text, "tokens": tokens, "duration": seconds}
        if spec.kind == "waveform":
            item["audio"] = array
            return item
        if self.augment and config.spec_augment is not None:
            rng = make_rng(self.seed, epoch, utterance.id, "spec-augment")
            array = spec_augment(array, config.spec_augment, rng)
        item["feats"] = array
        return item

    def _speed_factor(self, utterance, epoch: int) -> float | None:
        """The utterance's speed factor in `epoch`; None without speed perturbation."""
        speeds = self.config.speed_perturb
        if not self.augment or len(speeds) == 1:
            return None
        return float(make_rng(self.seed, epoch, utterance.id, "speed").choice(speeds))

    def _variant(
        self, utterance, epoch: int
    ) -> tuple[float | None, int | None, tuple[str, float, int]]:
        """The utterance's speed factor and augmented copy in `epoch`, and the feature
        cache's key for that pair."""
        factor = self._speed_factor(utterance, epoch)
        copy = self._augment_copy(utterance, epoch)
        return factor, copy, (utterance.id, factor or 1.0, copy or 0)

    def _augment_copy(self, utterance, epoch: int) -> int | None:
        """Which of `augment.copies` fixed augmented versions `epoch` uses; None when each
        epoch draws afresh (or there is no waveform augmentation)."""
        if self.augmenter is None or self.augmenter.config.copies is None:
            return None
        copies = self.augmenter.config.copies
        return int(make_rng(self.seed, epoch, utterance.id, "augment-copy").integers(copies))

    def fill_cache(
        self,
        plans: Iterable[BatchPlan],
        jobs: int,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Compute with `jobs` processes the features the cache lacks for `plans`; returns
        how many entries it added. The first epoch would otherwise compute them one by one
        in the training process. An utterance that fails to load is left out: the pass
        loads it again, and skips and counts it there. When `should_stop` turns True (a
        stop request) the fill ends early: the pass computes what is missing itself."""
        if self.cache is None:
            return 0
        wanted: dict[tuple[str, float, int], tuple[int, int, float | None, int | None]] = {}
        for plan in plans:
            for index in plan.utterances:
                utterance = self.manifest.utterances[index]
                factor, copy, key = self._variant(utterance, plan.epoch)
                if key not in self.cache:
                    wanted[key] = (index, plan.epoch, factor, copy)
        if not wanted:
            return 0
        global _FILLING
        _FILLING = self  # forked workers read it instead of unpickling the dataset
        work = list(wanted.items())
        chunks = [work[i : i + FILL_CHUNK] for i in range(0, len(work), FILL_CHUNK)]
        added, failures, example = 0, Counter(), ""
        try:
            results = fork_map(
                _fill_chunk,
                chunks,
                jobs,
                initializer=_worker_init,
                should_stop=should_stop,
                name="feature cache",
            )
            for chunk_results in results:
                for key, (array, seconds, failed) in chunk_results:
                    array.setflags(write=False)
                    self.cache[key] = (array, seconds)
                    added += 1
                    for reason, message in failed:
                        failures[reason] += 1
                        example = example or f"{key[0]}: {message}"
        finally:
            _FILLING = None
        if failures:
            parts = ", ".join(f"{n} {reason}" for reason, n in sorted(failures.items()))
            log.warning(
                "feature cache: augmentation not applied to %d entries (%s; first: %s)",
                sum(failures.values()),
                parts,
                example,
            )
        return added

    def _features(
        self, utterance, epoch: int, factor: float | None, copy: int | None = None
    ) -> tuple[np.ndarray, float, list[tuple[str, str]]]:
        """(fbank features, or samples for waveform input; seconds of audio after speed
        perturbation; waveform augmentation that failed, as (reason, message)), before
        SpecAugment."""
        config, spec = self.config, self.input_spec
        samples = audio_io.load_audio(
            utterance.audio,
            sample_rate=spec.sample_rate,
            offset=utterance.offset,
            duration=utterance.duration,
        )
        seconds = samples.shape[0] / spec.sample_rate
        # The sampler already applied the limits to the manifest's durations; the audio
        # read can still be shorter (within the truncation slack), never longer.
        if seconds < config.min_duration:
            raise AudioError(TOO_SHORT, f"{seconds:.3f} s is shorter than {config.min_duration} s")
        if factor is not None:
            samples = speed_perturb(samples, spec.sample_rate, factor)
        seconds = samples.shape[0] / spec.sample_rate
        failed: list[tuple[str, str]] = []
        if self.augmenter is not None:
            # A copy is the same in every epoch that uses it; otherwise each epoch draws anew.
            rng = (
                make_rng(self.seed, "augment-copy", copy, utterance.id)
                if copy is not None
                else make_rng(self.seed, epoch, utterance.id, "augment")
            )
            samples, errors = self.augmenter(samples, rng)
            failed = [(error.reason, str(error)) for error in errors]
        if spec.kind == "waveform":
            return samples, seconds, failed
        dither_rng = make_rng(self.seed, epoch, utterance.id, "dither") if self.augment else None
        fbank = spec.fbank if self.augment else _without_dither(spec.fbank)
        feats = compute_fbank(samples, spec.sample_rate, fbank, dither_rng)
        if feats.shape[0] == 0:
            raise AudioError(TOO_SHORT, "too short for a single feature frame")
        return feats, seconds, failed

    def _collate(self, plan: BatchPlan, items: list[dict], skipped: list[Skip], unknown) -> Batch:
        tokens = token_lens = feats = feat_lens = audio = audio_lens = None
        if self.tokenizer is not None:
            tokens, token_lens = _pad(
                [np.asarray(i["tokens"], dtype=np.int64) for i in items], IGNORE_ID
            )
        if self.input_spec.kind == "fbank":
            dim = self.input_spec.fbank.num_mel_bins
            feats, feat_lens = _pad([i["feats"] for i in items], 0.0, trailing=(dim,))
        else:
            audio, audio_lens = _pad([i["audio"] for i in items], 0.0)
        hotwords = None
        if self.config.hotwords is not None and tokens is not None:
            hotwords = sample_batch_hotwords(
                [i["text"] for i in items],
                [i["id"] for i in items],
                tokens,
                token_lens,
                self.tokenizer,
                seed=self.seed,
                epoch=plan.epoch,
                config=self.config.hotwords,
            )
        return Batch(
            epoch=plan.epoch,
            index=plan.index,
            ids=[i["id"] for i in items],
            texts=[i["text"] for i in items],
            durations=[i["duration"] for i in items],
            tokens=tokens,
            token_lens=token_lens,
            feats=feats,
            feat_lens=feat_lens,
            audio=audio,
            audio_lens=audio_lens,
            skipped=skipped,
            unknown_chars=unknown,
            samples_per_frame=1 if feats is not None else waveform_frame_samples(self.input_spec),
            seed=self.seed,
            hotwords=hotwords.tokens if hotwords is not None else None,
            hotword_lens=hotwords.lens if hotwords is not None else None,
            bias_targets=hotwords.bias_targets if hotwords is not None else None,
        )


def waveform_frame_samples(spec: InputSpec) -> int:
    """Samples in one frame of a waveform input (10 ms: the unit of max_frames)."""
    return max(1, round(spec.sample_rate / spec.frames_per_second))


def _without_dither(config: FbankConfig) -> FbankConfig:
    return FbankConfig(config.num_mel_bins, config.frame_length_ms, config.frame_shift_ms, 0.0)


def _pad(
    arrays: list[np.ndarray], value: float, trailing: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length arrays along a new batch axis. Returns (padded, lengths)."""
    lengths = torch.tensor([a.shape[0] for a in arrays], dtype=torch.int64)
    longest = int(lengths.max()) if arrays else 0
    dtype = arrays[0].dtype if arrays else np.float32
    padded = np.full((len(arrays), longest, *trailing), value, dtype=dtype)
    for row, array in enumerate(arrays):
        padded[row, : array.shape[0]] = array
    return torch.from_numpy(padded), lengths


@dataclass
class PassReport:
    """What one pass over a manifest used and skipped; logged at the end of the pass."""

    epoch: int
    batches: int = 0
    utterances: int = 0
    seconds: float = 0.0
    real_frames: int = 0
    padded_frames: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first message seen
    unknown_chars: Counter[str] = field(default_factory=Counter)
    augment_failures: Counter[str] = field(default_factory=Counter)  # reason -> count

    def add(self, batch: Batch) -> None:
        self.batches += 1
        self.utterances += batch.size
        self.seconds += sum(batch.durations)
        self.real_frames += batch.real_frames
        self.padded_frames += batch.padded_frames
        self.unknown_chars.update(batch.unknown_chars)
        for skip in batch.skipped:
            self.skipped[skip.reason] += 1
            self.examples.setdefault(skip.reason, f"{skip.where}: {skip.utt_id}: {skip.message}")
        for reason, message in batch.augment_failures:
            self.augment_failures[reason] += 1
            self.examples.setdefault(f"augment_{reason}", message)

    def add_excluded(self, reason: str, count: int, example: str) -> None:
        if count:
            self.skipped[reason] += count
            self.examples.setdefault(reason, example)

    @property
    def padding_efficiency(self) -> float:
        return self.real_frames / self.padded_frames if self.padded_frames else 1.0

    def summary(self) -> str:
        text = (
            f"epoch {self.epoch}: {self.utterances} utterances ({self.seconds / 3600:.2f} h) "
            f"in {self.batches} batches, padding efficiency {self.padding_efficiency:.3f}"
        )
        if self.skipped:
            parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            text += f"; skipped {sum(self.skipped.values())} ({parts})"
        if self.augment_failures:
            parts = ", ".join(f"{n} {r}" for r, n in sorted(self.augment_failures.items()))
            first = next(v for k, v in self.examples.items() if k.startswith("augment_"))
            text += (
                f"; augmentation not applied to {sum(self.augment_failures.values())} "
                f"utterances ({parts}; first: {first})"
            )
        if self.unknown_chars:
            top = ", ".join(f"{c!r} x{n}" for c, n in self.unknown_chars.most_common(5))
            text += (
                f"; {sum(self.unknown_chars.values())} unknown characters mapped to <unk> ({top})"
            )
        return text

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "utterances": self.utterances,
            "hours": self.seconds / 3600,
            "padding_efficiency": self.padding_efficiency,
            "skipped": dict(self.skipped),
            "skip_examples": dict(self.examples),
            "unknown_chars": dict(self.unknown_chars),
            "augment_failures": dict(self.augment_failures),
        }


def _identity(batch: Batch) -> Batch:
    return batch


_FILLING: AsrDataset | None = None  # the dataset whose cache `fill_cache` is filling


def _fill_chunk(chunk: list) -> list:
    pause = os.environ.get("ECHOIC_PAUSE_IN_CACHE_FILL")
    if pause:  # test hook: a fill that never ends, to signal the run from outside
        Path(pause).touch()
        while True:
            time.sleep(1)
    dataset, results = _FILLING, []
    for key, (index, epoch, factor, copy) in chunk:
        utterance = dataset.manifest.utterances[index]
        # A failure is left for the pass itself, which loads it again and counts the skip.
        with contextlib.suppress(AudioError):
            results.append((key, dataset._features(utterance, epoch, factor, copy)))
    return results


def _worker_init(_worker_id: int = 0) -> None:
    # Workers do numpy work; one torch thread each keeps them from fighting over cores.
    torch.set_num_threads(1)
    ignore_stop_signals()


class BatchLoader:
    """Iterates the sampler's current pass as `Batch`es, loading with `num_workers` processes.

    Batches with every utterance skipped are still yielded (size 0), so a consumer can
    track its position exactly; `last_report` holds the summary of the latest pass.
    """

    def __init__(
        self,
        dataset: AsrDataset,
        sampler: BucketBatchSampler,
        num_workers: int = 0,
        name: str = "data",
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.num_workers = num_workers
        self.name = name
        self.last_report: PassReport | None = None
        # The trainer's stop request: a feature-cache fill ends early when it turns True.
        self.should_stop: Callable[[], bool] | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        report = PassReport(epoch=self.sampler.epoch)
        manifest = self.dataset.manifest
        for reason, indices in self.sampler.excluded.items():
            if indices:
                first = manifest.utterances[indices[0]]
                where = manifest.where(indices[0])
                example = f"{where}: {first.id}: manifest duration {first.duration} s"
                report.add_excluded(reason, len(indices), example)
        workers = self.num_workers
        if self.dataset.cache is not None:
            if workers:
                start = time.perf_counter()
                try:
                    added = self.dataset.fill_cache(self.sampler, workers, self.should_stop)
                except WorkerError as error:
                    # The cache is only a speed-up: the pass computes what is missing.
                    log.warning(
                        "%s feature cache fill failed, continuing without: %s", self.name, error
                    )
                    added = 0
                if added:
                    log.info(
                        "%s feature cache: computed %d entries with %d processes in %.1f s",
                        self.name,
                        added,
                        workers,
                        time.perf_counter() - start,
                    )
            workers = 0  # the batches come from the cache, in this process
        loader = torch.utils.data.DataLoader(
            self.dataset,
            sampler=self.sampler,
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            worker_init_fn=_worker_init if workers else None,
            prefetch_factor=2 if workers else None,
            # A generator of its own: otherwise starting the workers draws from torch's
            # global generator, and model randomness would depend on when passes start.
            generator=torch.Generator(),
        )
        fatal_missing = self.dataset.config.on_missing_audio == "error"
        for batch in loader:
            for skip in batch.skipped:
                if fatal_missing and skip.reason == audio_io.MISSING:
                    raise ManifestError(f"{skip.where}: {skip.message}")
            report.add(batch)
            yield batch
        self.last_report = report
        cached = ""
        if self.dataset.cache is not None:
            cache = self.dataset.cache
            cached = (
                f"; feature cache {len(cache)} entries, {self.dataset.cache_bytes / 2**20:.0f} MB"
            )
        log.info("%s pass summary: %s%s", self.name, report.summary(), cached)


def build_loader(
    manifest: Manifest,
    tokenizer: Tokenizer | None,
    config: DataConfig,
    *,
    input_spec: InputSpec = FBANK_80,
    seed: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
) -> BatchLoader:
    """The loader for training (shuffled, augmented) or evaluation (sorted, clean).
    `input_spec` is the model's (`model.input_spec`): which features to compute."""
    length_factor = 1.0 / min(config.speed_perturb) if train else 1.0
    sampler = BucketBatchSampler(
        [u.duration for u in manifest.utterances],
        frames_per_second=input_spec.frames_per_second,
        max_frames=config.max_frames,
        batch_size=config.batch_size,
        max_batch_size=config.max_batch_size,
        num_buckets=config.num_buckets,
        shuffle=train,
        seed=seed,
        rank=rank,
        world_size=world_size,
        min_duration=config.min_duration,
        max_duration=config.max_duration,
        length_factor=length_factor,
        drop_last=train,
    )
    dataset = AsrDataset(
        manifest, tokenizer, config, input_spec=input_spec, seed=seed, augment=train
    )
    return BatchLoader(
        dataset, sampler, num_workers=config.num_workers, name="train" if train else "eval"
    )
