"""Conformer encoder training step on CPU: forward + backward of a 12-layer, 256-dim,
4-head, 1024-FFN, kernel-15 Conformer on a batch of 8 x 10 s of 80-dim fbank.

Prints one JSON line: frames_per_s (input 10 ms frames per second of step time) and
peak_mb (rise of ru_maxrss over the state after the model and input exist). With
--wenet-root pointing at a WeNet checkout (outside this repository), WeNet's
ConformerEncoder of the same size (rel_pos, macaron, batch-norm conv module, dropout
0.1) is measured in the same run, imported with the anchor script `wenet_import.py`
from --anchors. echoic's attention always goes through torch's
scaled_dot_product_attention, WeNet's only with its `use_sdpa` switch (off by default),
so WeNet is measured both ways unless --wenet-sdpa says otherwise: keys wenet_* and
speedup / memory_ratio (echoic / WeNet) are for use_sdpa off, wenet_sdpa_* and
speedup_sdpa / memory_ratio_sdpa for use_sdpa on. These machines are noisy, so each
implementation runs in a fresh process per round, rounds alternate between them, and
figures are medians over all timed steps (and over rounds, for memory).

    python benchmarks/encoder.py [--threads 2] [--wenet-root /tmp/wenet --anchors ../shared/anchors]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from echoic.models.encoders import ConformerConfig, Encoder

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is not a package
from _common import maxrss_mb, run_worker

BATCH, FRAMES, FEATURES = 8, 1000, 80
# WeNet rows: row name -> its use_sdpa value, and which rows each --wenet-sdpa mode runs
WENET_ROWS = {"wenet": False, "wenet_sdpa": True}
SDPA_MODES = {"off": ["wenet"], "on": ["wenet_sdpa"], "both": ["wenet", "wenet_sdpa"]}


def build(args) -> torch.nn.Module:
    if args.impl in WENET_ROWS:
        sys.path.insert(0, os.path.abspath(args.anchors))
        import wenet_import

        encoder_class, _, _ = wenet_import.load_conformer_encoder(args.wenet_root)
        use_sdpa = WENET_ROWS[args.impl]
        return encoder_class(**dict(wenet_import.CONFIG_12x256, use_sdpa=use_sdpa))
    config = ConformerConfig(
        d_model=256,
        num_layers=12,
        num_heads=4,
        ffn_dim=1024,
        conv_kernel=15,
        dropout=0.1,
        positional=args.positional,
    )
    encoder = Encoder(config, input_dim=FEATURES)
    encoder.gradient_checkpointing = args.checkpointing
    return encoder


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args).train()
    feats = torch.randn(BATCH, FRAMES, FEATURES)
    lengths = torch.full((BATCH,), FRAMES)
    base = maxrss_mb()
    times = []
    for step in range(args.warmup + args.repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out, _ = model(feats, lengths)
        out.sum().backward()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {
        "frames_per_s": BATCH * FRAMES / statistics.median(times),
        "peak_mb": maxrss_mb() - base,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": [round(t, 3) for t in times],
    }


def _run(impl: str, args, extra: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return run_worker(__file__, "encoder", impl, extra, env, args.timeout)


def _summary(runs: list[dict]) -> dict:
    steps = [t for run in runs for t in run["step_s"]]
    return {
        "frames_per_s": BATCH * FRAMES / statistics.median(steps),
        "peak_mb": statistics.median(run["peak_mb"] for run in runs),
        "params_m": runs[0]["params_m"],
        "step_s": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["echoic", *WENET_ROWS], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per implementation")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--positional", choices=["rel_pos", "rope"], default="rel_pos")
    parser.add_argument(
        "--checkpointing", action="store_true", help="gradient checkpointing per block"
    )
    parser.add_argument(
        "--wenet-root", help="a WeNet checkout, to measure its encoder in the same run"
    )
    parser.add_argument(
        "--wenet-sdpa",
        choices=list(SDPA_MODES),
        nargs="?",
        const="on",  # the bare flag of old commands meant use_sdpa on
        default="both",
        help="WeNet's use_sdpa switch: off, on, or both (two WeNet rows)",
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per worker process")
    parser.add_argument(
        "--anchors",
        default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "anchors"),
    )
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(worker(args)))
        return
    extra = [a for a in sys.argv[1:]]
    rows = ["echoic", *(SDPA_MODES[args.wenet_sdpa] if args.wenet_root else [])]
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for _ in range(args.rounds):
        for row in rows:
            runs[row].append(_run(row, args, extra))
    echoic = _summary(runs["echoic"])
    result = {
        "bench": "encoder_train_step",
        "batch": BATCH,
        "frames": FRAMES,
        "threads": args.threads,
        "positional": args.positional,
        "gradient_checkpointing": args.checkpointing,
        "frames_per_s": round(echoic["frames_per_s"], 1),
        "peak_mb": round(echoic["peak_mb"], 1),
        "params_m": round(echoic["params_m"], 2),
        "step_s": echoic["step_s"],
    }
    for row in rows[1:]:
        wenet = _summary(runs[row])
        suffix = "_sdpa" if WENET_ROWS[row] else ""
        result.update(
            {
                f"{row}_frames_per_s": round(wenet["frames_per_s"], 1),
                f"{row}_peak_mb": round(wenet["peak_mb"], 1),
                f"{row}_params_m": round(wenet["params_m"], 2),
                f"{row}_step_s": wenet["step_s"],
                f"speedup{suffix}": round(echoic["frames_per_s"] / wenet["frames_per_s"], 3),
                f"memory_ratio{suffix}": round(echoic["peak_mb"] / wenet["peak_mb"], 3),
            }
        )
    result.update(torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
