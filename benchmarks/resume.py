"""How long resuming takes, at step 10 and at step 10,000 of one long epoch.

A run whose epoch holds 25,000 batches (manifest lines pointing at the built-in
corpus's audio) trains 10 steps and saves a checkpoint. A second checkpoint is the
same state moved to batch 10,000 (step 10,000): what a resume there has to do is
load the same files and seek further into the epoch. Each is resumed in a fresh
process that trains one step and exits; the figure is that process's wall time,
from start to exit (import, setup, checkpoint load, data seek, one step, one save).
Prints one JSON line with resume_s_at_10 and resume_s_at_10000 (medians of --repeats).

    python benchmarks/resume.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from echoic.data.manifest import Utterance, read_manifest, write_manifest
from echoic.data.prepare import prepare
from echoic.data.synth.corpus import synthesize_corpus
from echoic.train import checkpoint as ckpt

EPOCH_BATCHES = 25_000


def _train(config: Path, exp: Path, max_steps: int) -> float:
    command = [
        sys.executable,
        "-m",
        "echoic",
        "train",
        str(config),
        "--exp",
        str(exp),
        "--no-progress",
        "--set",
        f"train.max_steps={max_steps}",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize_corpus(root / "corpus", num_utts=24, seed=0, jobs=os.cpu_count(), progress=False)
        prepare(root / "corpus" / "train.jsonl", root / "lang", jobs=1, progress=False)
        source = read_manifest(root / "corpus" / "train.jsonl").utterances
        long_epoch = [
            Utterance(
                f"u{i:06d}",
                source[i % len(source)].audio,
                source[i % len(source)].text,
                source[i % len(source)].duration,
            )
            for i in range(EPOCH_BATCHES)
        ]
        write_manifest(root / "long.jsonl", long_epoch)
        config = {
            "data": {
                "train": str(root / "long.jsonl"),
                "lang": str(root / "lang"),
                "max_frames": None,
                "batch_size": 1,
                "num_workers": 2,
            },
            "model": {
                "encoder": {
                    "conformer": {
                        "d_model": 32,
                        "num_layers": 1,
                        "num_heads": 2,
                        "ffn_dim": 64,
                        "conv_kernel": 5,
                    }
                },
                "ctc": {"weight": 1.0},
            },
            "optim": {"warmup_steps": 10},
            "train": {"max_epochs": 1, "save_every_steps": 10, "log_every": 1},
        }
        config_path = root / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        base = root / "base"
        _train(config_path, base, 10)

        early = ckpt.list_checkpoints(base / "checkpoints")[-1]
        weights, state = ckpt.load_checkpoint(early)
        state.update(step=10_000, batch_index=10_000)
        late_dir = root / "late-checkpoints"
        late = ckpt.save_checkpoint(late_dir, 10_000, weights, state)

        results = {}
        for name, checkpoint, step in (("10", early, 10), ("10000", late, 10_000)):
            times = []
            for _ in range(args.repeats):
                exp = root / f"exp-{name}"
                shutil.rmtree(exp, ignore_errors=True)
                shutil.copytree(base, exp, ignore=shutil.ignore_patterns("checkpoints"))
                shutil.copytree(checkpoint, exp / "checkpoints" / checkpoint.name)
                times.append(_train(config_path, exp, step + 1))
            results[f"resume_s_at_{name}"] = round(statistics.median(times), 2)
            results[f"resume_s_at_{name}_runs"] = [round(t, 2) for t in times]
    results.update(epoch_batches=EPOCH_BATCHES, cpus=os.cpu_count(), machine=platform.machine())
    results["ratio"] = round(results["resume_s_at_10000"] / results["resume_s_at_10"], 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
