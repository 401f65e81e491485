"""Data-pipeline throughput on the built-in corpus: load + speed perturbation + fbank +
SpecAugment + collate, one full training pass per worker setting.

Prints one JSON line per setting:
    workers       data-loading processes
    utts_per_s    utterances per wall-clock second
    rtf           wall seconds per second of audio (what a trainer waits for)
    cpu_rtf       CPU seconds (this process and its workers) per second of audio
and the settings, padding efficiency and, when this script synthesized the corpus,
`synth_s`: the seconds `echoic synth` took for it. With --feature-cache, two more lines:
the first and the second pass of a loader with `feature_cache: true`, with `cache_mb`.
With --augment, one line per waveform augmentation (none, reverb, each noise kind,
channel, and robust.yaml's mix), each a first pass (fbank computed) in one process:
`utts_per_s` is then what one worker delivers, `ms_per_utt` the augmentation's share;
and, where audiomentations is installed, `library` lines timing its equivalent
transform against echoic's on the same utterances (ms per utterance, one thread).

    python benchmarks/data_pipeline.py                  # synthesizes 2,000 utterances first
    python benchmarks/data_pipeline.py --corpus data/synth_en
    python benchmarks/data_pipeline.py --corpus data/synth_en --workers 2 --feature-cache
    python benchmarks/data_pipeline.py --corpus data/synth_en --workers 0 --augment
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

from echoic.config import from_dict
from echoic.data.augment import (
    ChannelConfig,
    NoiseConfig,
    ReverbConfig,
    WaveformAugmentConfig,
    colored_noise,
    mix_at_snr,
    reverberate,
    telephone,
)
from echoic.data.dataset import DataConfig, build_loader
from echoic.data.manifest import read_manifest
from echoic.data.synth.corpus import synthesize_corpus
from echoic.data.tokenizer import CharTokenizer


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _pass(loader) -> dict:
    """One pass over the loader's current epoch: throughput and the pass report."""
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    utterances = 0
    for batch in loader:
        utterances += batch.size
    wall = time.perf_counter() - wall0
    cpu = _cpu_seconds() - cpu0
    report = loader.last_report
    return {
        "utts_per_s": round(utterances / wall, 1),
        "rtf": round(wall / report.seconds, 5),
        "cpu_rtf": round(cpu / report.seconds, 5),
        "utterances": utterances,
        "audio_hours": round(report.seconds / 3600, 3),
        "batches": report.batches,
        "padding_efficiency": round(report.padding_efficiency, 4),
    }


def measure(corpus: Path, workers: int, max_frames: int) -> dict:
    manifest = read_manifest(corpus / "train.jsonl")
    tokenizer = CharTokenizer.train(u.text for u in manifest.utterances)
    config = DataConfig(max_frames=max_frames, speed_perturb=[0.9, 1.0, 1.1], num_workers=workers)
    loader = build_loader(manifest, tokenizer, config, seed=0, train=True)
    return {
        "workers": workers,
        **_pass(loader),
        "max_frames": max_frames,
        "augment": "speed 0.9/1.0/1.1 + SpecAugment",
    }


def measure_feature_cache(corpus: Path, max_frames: int) -> list[dict]:
    """`feature_cache: true` as the demo uses it (no speed perturbation, so every
    utterance has one entry): the first pass computes fbank, the second reads memory."""
    manifest = read_manifest(corpus / "train.jsonl")
    tokenizer = CharTokenizer.train(u.text for u in manifest.utterances)
    config = DataConfig(max_frames=max_frames, num_workers=0, feature_cache=True)
    loader = build_loader(manifest, tokenizer, config, seed=0, train=True)
    rows = []
    for epoch in (0, 1):
        loader.sampler.set_position(epoch)
        row = {"workers": 0, "feature_cache": "first pass" if epoch == 0 else "cached pass"}
        row.update(_pass(loader), max_frames=max_frames, augment="SpecAugment")
        row["cache_mb"] = round(loader.dataset.cache_bytes / 2**20)
        rows.append(row)
    return rows


AUGMENT_ROWS = {
    "none": None,
    "reverb": WaveformAugmentConfig(reverb=ReverbConfig(prob=1.0)),
    "noise colored": WaveformAugmentConfig(noise=NoiseConfig(prob=1.0, babble=0.0)),
    "noise babble": WaveformAugmentConfig(noise=NoiseConfig(prob=1.0, colored=0.0)),
    "channel": WaveformAugmentConfig(channel=ChannelConfig(prob=1.0)),
    "robust.yaml": "recipes/synth_en/conf/robust.yaml",  # read from the recipe
}


def measure_augment(corpus: Path, max_frames: int, limit: int) -> list[dict]:
    """One first pass (load + augmentation + fbank, no cache, no SpecAugment) per row,
    over the first `limit` utterances, in this process: one worker's throughput."""
    manifest = read_manifest(corpus / "train.jsonl")
    manifest = replace(
        manifest, utterances=manifest.utterances[:limit], lines=manifest.lines[:limit]
    )
    tokenizer = CharTokenizer.train(u.text for u in manifest.utterances)
    rows = []
    for name, augment in AUGMENT_ROWS.items():
        if isinstance(augment, str):
            recipe = yaml.safe_load((Path(__file__).parent.parent / augment).read_text())
            augment = from_dict(WaveformAugmentConfig, recipe["data"]["augment"], name)
        config = DataConfig(
            max_frames=max_frames, num_workers=0, spec_augment=None, augment=augment
        )
        loader = build_loader(manifest, tokenizer, config, seed=0, train=True)
        row = {"workers": 0, "augment": name, **_pass(loader), "max_frames": max_frames}
        rows.append(row)
    base = 1000 / rows[0]["utts_per_s"]
    for row in rows:
        row["ms_per_utt"] = round(1000 / row["utts_per_s"], 2)
        row["augment_ms_per_utt"] = round(row["ms_per_utt"] - base, 2)
    return rows


def measure_libraries(corpus: Path, count: int = 200) -> list[dict]:
    """echoic's transforms against audiomentations' equivalents, ms per utterance."""
    try:
        import audiomentations as am
    except ImportError:
        return []
    import soundfile as sf

    from echoic.data.audio import load_audio
    from echoic.data.noise import simulated_rirs

    rate = 16000
    utterances = read_manifest(corpus / "train.jsonl").utterances[:count]
    audio = [load_audio(u.audio, sample_rate=rate) for u in utterances]
    rirs = simulated_rirs(ReverbConfig(), rate)[:20]
    rng = np.random.default_rng(0)

    def timed(function) -> float:
        start = time.perf_counter()
        for samples in audio:
            function(samples)
        return round(1000 * (time.perf_counter() - start) / len(audio), 3)

    with tempfile.TemporaryDirectory() as folder:
        for index, rir in enumerate(rirs):
            sf.write(Path(folder) / f"rir{index:02d}.wav", rir, rate)
        pairs = {
            "pink noise at an SNR": (
                lambda x: mix_at_snr(x, colored_noise(x.shape[0], "pink", rng), 10.0),
                am.AddColorNoise(
                    min_snr_db=10, max_snr_db=10, min_f_decay=-3.01, max_f_decay=-3.01, p=1.0
                ),
            ),
            "room impulse response": (
                lambda x: reverberate(x, rirs[int(rng.integers(len(rirs)))]),
                am.ApplyImpulseResponse(ir_path=folder, p=1.0),
            ),
            "telephone band 300-3400 Hz": (
                lambda x: telephone(x, rate, 300.0, 3400.0, mulaw=False),
                am.BandPassFilter(
                    # centre 1850 Hz, bandwidth 3100 Hz: 300-3400 Hz
                    min_center_freq=1850,
                    max_center_freq=1850,
                    min_bandwidth_fraction=3100 / 1850,
                    max_bandwidth_fraction=3100 / 1850,
                    zero_phase=True,
                    p=1.0,
                ),
            ),
        }
        rows = []
        for name, (ours, theirs) in pairs.items():
            rows.append(
                {
                    "library": name,
                    "echoic_ms_per_utt": timed(ours),
                    "audiomentations_ms_per_utt": timed(partial(theirs, sample_rate=rate)),
                    "audiomentations": am.__version__,
                    "utterances": len(audio),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="an `echoic synth` folder (default: make one)")
    parser.add_argument("--num-utts", type=int, default=2000, help="utterances to synthesize")
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--max-frames", type=int, default=12000)
    parser.add_argument(
        "--feature-cache", action="store_true", help="add two passes with data.feature_cache"
    )
    parser.add_argument(
        "--augment", action="store_true", help="add one pass per waveform augmentation"
    )
    parser.add_argument(
        "--augment-utts", type=int, default=2000, help="utterances per --augment pass"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        synth_s = None
        corpus = args.corpus
        if corpus is None:
            corpus = Path(tmp) / "corpus"
            start = time.perf_counter()
            synthesize_corpus(corpus, num_utts=args.num_utts, jobs=os.cpu_count(), progress=False)
            synth_s = round(time.perf_counter() - start, 1)
        results = [measure(corpus, int(w), args.max_frames) for w in args.workers.split(",")]
        if args.feature_cache:
            results += measure_feature_cache(corpus, args.max_frames)
        if args.augment:
            torch.set_num_threads(1)  # as a data worker runs
            results += measure_augment(corpus, args.max_frames, args.augment_utts)
            results += measure_libraries(corpus)
        for result in results:
            result.update(
                synth_s=synth_s,
                synth_utts=args.num_utts if synth_s is not None else None,
                cpus=os.cpu_count(),
                machine=platform.machine(),
                torch=torch.__version__,
            )
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
