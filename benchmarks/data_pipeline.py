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

    python benchmarks/data_pipeline.py                  # synthesizes 2,000 utterances first
    python benchmarks/data_pipeline.py --corpus data/synth_en
    python benchmarks/data_pipeline.py --corpus data/synth_en --workers 2 --feature-cache
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="an `echoic synth` folder (default: make one)")
    parser.add_argument("--num-utts", type=int, default=2000, help="utterances to synthesize")
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--max-frames", type=int, default=12000)
    parser.add_argument(
        "--feature-cache", action="store_true", help="add two passes with data.feature_cache"
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
