"""Data-pipeline throughput on the built-in corpus: load + speed perturbation + fbank +
SpecAugment + collate, one full training pass per worker setting.

Prints one JSON line per setting:
    workers       data-loading processes
    utts_per_s    utterances per wall-clock second
    rtf           wall seconds per second of audio (what a trainer waits for)
    cpu_rtf       CPU seconds (this process and its workers) per second of audio
and the settings, padding efficiency and, when this script synthesized the corpus,
`synth_s`: the seconds `echoic synth` took for it.

    python benchmarks/data_pipeline.py                  # synthesizes 2,000 utterances first
    python benchmarks/data_pipeline.py --corpus data/synth_en
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


def measure(corpus: Path, workers: int, max_frames: int) -> dict:
    manifest = read_manifest(corpus / "train.jsonl")
    tokenizer = CharTokenizer.train(u.text for u in manifest.utterances)
    config = DataConfig(max_frames=max_frames, speed_perturb=[0.9, 1.0, 1.1], num_workers=workers)
    loader = build_loader(manifest, tokenizer, config, seed=0, train=True)
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    utterances = 0
    for batch in loader:
        utterances += batch.size
    wall = time.perf_counter() - wall0
    cpu = _cpu_seconds() - cpu0
    report = loader.last_report
    return {
        "workers": workers,
        "utts_per_s": round(utterances / wall, 1),
        "rtf": round(wall / report.seconds, 5),
        "cpu_rtf": round(cpu / report.seconds, 5),
        "utterances": utterances,
        "audio_hours": round(report.seconds / 3600, 3),
        "batches": report.batches,
        "padding_efficiency": round(report.padding_efficiency, 4),
        "max_frames": max_frames,
        "augment": "speed 0.9/1.0/1.1 + SpecAugment",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="an `echoic synth` folder (default: make one)")
    parser.add_argument("--num-utts", type=int, default=2000, help="utterances to synthesize")
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--max-frames", type=int, default=12000)
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
        for workers in (int(w) for w in args.workers.split(",")):
            result = measure(corpus, workers, args.max_frames)
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
