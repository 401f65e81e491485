"""HuBERT pretraining throughput and k-means fitting, as the recipe runs them.

Prints one JSON line per row:

- `pretrain`: the recipe's model (recipes/synth_hubert/conf/pretrain_it1.yaml, or
  --config) taking full training steps (forward, backward, AdamW) on batches of
  --batch utterances x --seconds of audio: model frames (20 ms) per second and audio
  seconds per wall second, min/median/max over --rounds, with peak memory (RSS on CPU,
  allocated on CUDA). One row per --precision (fp32, bf16 autocast) and device.
- `kmeans`: fit time and inertia (mean squared distance to the nearest centroid) of
  scikit-learn's MiniBatchKMeans and faiss on the same frames: 39-dim MFCC of a
  manifest's audio (--manifest), or of synthetic noise when none is given.

    python benchmarks/hubert.py --threads 2
    python benchmarks/hubert.py --manifest data/synth_en/train.jsonl --k 100 --kmeans-frames 300000
    python benchmarks/hubert.py --device cuda --precision fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from echoic.config import from_dict
from echoic.models.hubert import HubertPretrainConfig, HubertPretrainModel
from echoic.pretrain.units import fit_kmeans, inertia, mfcc_units_features, unit_frames

RECIPE = Path(__file__).resolve().parent.parent / "recipes/synth_hubert/conf/pretrain_it1.yaml"


def pretrain_row(args, precision: str) -> dict:
    raw = yaml.safe_load(Path(args.config).read_text())["model"]["hubert"]
    config = from_dict(HubertPretrainConfig, raw, "model.hubert")
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = HubertPretrainModel(config, args.k).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    samples = int(args.seconds * 16000)
    generator = torch.Generator().manual_seed(0)
    audio = (torch.randn(args.batch, samples, generator=generator) * 0.1).to(device)
    lengths = torch.full((args.batch,), samples, device=device)
    frames = unit_frames(samples)
    tokens = torch.randint(2, 2 + args.k, (args.batch, frames), generator=generator).to(device)

    from echoic.data.batch import Batch

    batch = Batch(
        epoch=0, index=0, ids=[f"u{i}" for i in range(args.batch)], texts=[""] * args.batch,
        durations=[args.seconds] * args.batch, tokens=tokens,
        token_lens=torch.full((args.batch,), frames, device=device), feats=None, feat_lens=None,
        audio=audio, audio_lens=lengths,
    )  # fmt: skip
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        (out.loss / args.batch).backward()
        optimizer.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) / args.steps)
    per_step = [args.batch * frames / t for t in times]
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "row": "pretrain",
        "device": str(device),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "batch": f"{args.batch} x {args.seconds:g} s",
        "parameters": sum(p.numel() for p in model.parameters()),
        "frames_per_s": {
            "min": round(min(per_step)),
            "median": round(statistics.median(per_step)),
            "max": round(max(per_step)),
        },
        "audio_s_per_s": round(statistics.median(per_step) * 0.02, 1),
        "peak_memory_mb": round(memory),
    }


def kmeans_frames(args) -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(0)
    if args.manifest is None:
        chunks = [mfcc_units_features(rng.standard_normal(16000 * 5).astype(np.float32) * 0.1)
                  for _ in range(max(1, args.kmeans_frames // 249))]  # fmt: skip
        return np.concatenate(chunks)[: args.kmeans_frames], "noise"
    from echoic.data.audio import load_audio
    from echoic.data.manifest import read_manifest

    utterances = read_manifest(args.manifest).utterances
    chunks, total = [], 0
    for index in rng.permutation(len(utterances)):
        u = utterances[index]
        samples = load_audio(u.audio, sample_rate=16000, offset=u.offset, duration=u.duration)
        chunks.append(mfcc_units_features(samples))
        total += len(chunks[-1])
        if total >= args.kmeans_frames:
            break
    return np.concatenate(chunks)[: args.kmeans_frames], args.manifest


def kmeans_rows(args) -> list[dict]:
    frames, source = kmeans_frames(args)
    rows = []
    for backend in ("sklearn", "faiss"):
        try:
            started = time.perf_counter()
            centroids = fit_kmeans(frames, args.k, seed=0, backend=backend)
            seconds = time.perf_counter() - started
        except Exception as error:  # a missing faiss is a row, not a crash
            rows.append({"row": "kmeans", "backend": backend, "error": str(error)})
            continue
        rows.append(
            {
                "row": "kmeans",
                "backend": backend,
                "frames": len(frames),
                "source": source,
                "k": args.k,
                "fit_s": round(seconds, 2),
                "inertia": round(inertia(frames, centroids), 4),
                "threads": torch.get_num_threads(),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(RECIPE), help="experiment YAML (model.hubert)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--manifest", help="k-means on this manifest's MFCC (default: noise)")
    parser.add_argument("--kmeans-frames", type=int, default=100_000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["pretrain", "kmeans"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "torch": torch.__version__}), flush=True)  # fmt: skip
    if "pretrain" not in args.skip:
        for precision in args.precision:
            print(json.dumps(pretrain_row(args, precision)), flush=True)
    if "kmeans" not in args.skip:
        for row in kmeans_rows(args):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
