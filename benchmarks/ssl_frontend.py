"""Training-step speed and memory of an SSL frontend model in three modes.

- frozen: the upstream runs in eval mode under no_grad every step;
- frozen_cache: the same, its features read from `model.frontend.ssl.cache` (filled
  by one pass before the timed steps; the fill time is reported as fill_s);
- finetuned: the upstream's transformer is trained (`freeze: feature_extractor`).

The upstream is a randomly initialised wav2vec2 of wav2vec2-base's shape (768 wide,
12 layers, 95 M parameters; speed does not depend on the weights), saved to a temp
folder, or `--upstream FOLDER` (any HuggingFace-format wav2vec2 / HuBERT / WavLM /
data2vec-audio folder). The downstream model is a 4 x 144 Conformer with a CTC head.
Each mode runs in a fresh process; frames are 10 ms of audio, so frames/s compare
with fbank models'. peak_mb is the rise of ru_maxrss over the state after the model
and inputs exist. One JSON line per mode, then a summary line with the speed-ups.

    .venv/bin/python benchmarks/ssl_frontend.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from echoic.data.batch import Batch
from echoic.models.asr import AsrConfig
from echoic.models.encoders import ConformerConfig, EncoderConfig
from echoic.models.frontend import FrontendConfig
from echoic.models.heads.ctc import CtcConfig
from echoic.models.model import build_model
from echoic.models.ssl import SslFrontendConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is not a package
from _common import maxrss_mb, run_worker

MODES = {
    "frozen": {"freeze": "all"},
    "frozen_cache": {"freeze": "all"},  # plus a cache folder
    "finetuned": {"freeze": "feature_extractor"},
}
VOCAB = 32
RATE = 16000


def make_upstream(folder: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    transformers.Wav2Vec2Model(transformers.Wav2Vec2Config()).save_pretrained(folder)
    return folder


def _batch(args, index: int) -> Batch:
    generator = torch.Generator().manual_seed(index)
    samples = int(args.seconds * RATE)
    # Lengths differ a little, as in a bucketed batch.
    lengths = torch.tensor([samples - 800 * i for i in range(args.batch)])
    audio = torch.randn(args.batch, samples, generator=generator) * 0.1
    audio *= torch.arange(samples)[None, :] < lengths[:, None]
    tokens = torch.randint(2, VOCAB - 1, (args.batch, 20), generator=generator)
    return Batch(
        epoch=0,
        index=index,
        ids=[f"utt{index}-{i}" for i in range(args.batch)],
        texts=[""] * args.batch,
        durations=[int(n) / RATE for n in lengths],
        tokens=tokens,
        token_lens=torch.full((args.batch,), 20),
        feats=None,
        feat_lens=None,
        audio=audio,
        audio_lens=lengths,
    )


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    ssl = dict(MODES[args.impl], path=args.upstream)
    if args.impl == "frozen_cache":
        ssl["cache"] = args.cache
    config = AsrConfig(
        frontend=FrontendConfig(ssl=SslFrontendConfig(**ssl)),
        encoder=EncoderConfig(
            conformer=ConformerConfig(
                d_model=144, num_layers=4, num_heads=4, ffn_dim=576, dropout=0.1
            )
        ),
        ctc=CtcConfig(),
    )
    torch.manual_seed(0)
    model = build_model(config, VOCAB).train()
    model.start_step(0)
    optimizer = torch.optim.AdamW(model.parameter_groups(), lr=1e-4)
    batches = [_batch(args, i) for i in range(args.warmup + args.repeats)]
    base = maxrss_mb()  # before the cache fill too: it runs the upstream
    fill_s = None
    if args.impl == "frozen_cache":  # the first pass computes and stores the features
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                model.frontend(batch)
        fill_s = time.perf_counter() - start
    steps = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        out = model(batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            steps.append(time.perf_counter() - start)
    frames = sum(batches[0].durations) * 100
    trained = sum(p.numel() for g in model.parameter_groups() for p in g["params"])
    return {
        "mode": args.impl,
        "frames_per_s": frames / statistics.median(steps),
        "step_s": steps,
        "peak_mb": maxrss_mb() - base,
        "fill_s": fill_s,
        "trained_params_m": trained / 1e6,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help="a HuggingFace-format folder (default: made here)")
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="utterances per batch")
    parser.add_argument("--seconds", type=float, default=4.0, help="longest utterance")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(worker(args)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as scratch:
        upstream = args.upstream or str(make_upstream(Path(scratch) / "upstream"))
        cache = str(Path(scratch) / "cache")
        extra = ["--upstream", upstream, "--cache", cache, "--threads", str(args.threads)]
        for name in ("batch", "seconds", "repeats", "warmup"):
            extra += [f"--{name}", str(getattr(args, name))]
        results = {}
        for mode in args.modes.split(","):
            results[mode] = run_worker(__file__, "ssl_frontend", mode, extra, env, args.timeout)
            print(json.dumps({k: _round(v) for k, v in results[mode].items()}), flush=True)
    summary = {
        "benchmark": "ssl_frontend",
        "upstream": args.upstream or "random wav2vec2-base shape (768 x 12)",
        "threads": args.threads,
        "batch": f"{args.batch} x {args.seconds} s",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    if "frozen" in results:
        for mode in ("frozen_cache", "finetuned"):
            if mode in results:
                ratio = results[mode]["frames_per_s"] / results["frozen"]["frames_per_s"]
                summary[f"{mode}_vs_frozen"] = round(ratio, 2)
    print(json.dumps(summary))


def _round(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


if __name__ == "__main__":
    main()
