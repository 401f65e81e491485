"""Conformer encoder training step on CPU: forward + backward of a 12-layer, 256-dim,
4-head, 1024-FFN, kernel-15 Conformer on a batch of 8 x 10 s of 80-dim fbank.

Prints one JSON line. Per row: input 10 ms frames per second of step time (median,
and min / max over all timed steps of all rounds) and peak_mb (rise of ru_maxrss over
the state after the model and input exist; median over rounds).

Rows: echoic, and with --wenet-root pointing at a WeNet checkout (outside this
repository) WeNet's ConformerEncoder of the same size (rel_pos, or with --positional
rope its rope_pos + rope_abs_selfattn; macaron, batch-norm conv module, dropout 0.1),
imported with the anchor script `wenet_import.py` from --anchors, with its `use_sdpa`
switch off (`wenet`) and on (`wenet_sdpa`). Each row
runs at every --precision (fp32, and bf16 = CPU autocast, the same context for both
toolkits); a bf16 row's name ends in `_bf16`. --compile adds `echoic_compiled` rows
(each block compiled as `train.compile: true` does). --recipe YAML measures that
recipe's Conformer (echoic rows only) instead of 12 x 256. These machines are noisy,
so each row runs in a fresh process per round and rounds alternate between rows.

The comparison rule: the headline `speedup` is echoic fp32 eager over WeNet fp32
(use_sdpa off; `speedup_sdpa` with it on), same precision. `best_speedup` is echoic's
fastest row over WeNet's fastest row, whatever their settings (named beside it).
`memory_ratio` is echoic's peak over WeNet's for the headline rows.

--profile instead prints, per implementation, where one fp32 step's time goes:
torch.profiler's top operators by self time, and each component (subsampling,
feed-forward, attention with its position term, convolution module, the rest of a
block, the optimizer step) timed forward + backward on its own at the step's shapes,
times its count per step.

    python benchmarks/encoder.py [--threads 2] [--precision fp32,bf16]
        [--wenet-root /tmp/wenet --anchors ../shared/anchors] [--profile] [--compile]
    python benchmarks/encoder.py --recipe recipes/synth_en/conf/demo.yaml --precision fp32,bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from echoic.models.encoders import ConformerConfig, Encoder
from echoic.train.compiled import compile_blocks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is not a package
from _common import maxrss_mb, run_worker

BATCH, FRAMES, FEATURES = 8, 1000, 80
# WeNet rows: row name -> its use_sdpa value, and which rows each --wenet-sdpa mode runs
WENET_ROWS = {"wenet": False, "wenet_sdpa": True}
SDPA_MODES = {"off": ["wenet"], "on": ["wenet_sdpa"], "both": ["wenet", "wenet_sdpa"]}
PRECISIONS = ("fp32", "bf16")


def build(impl: str, args) -> torch.nn.Module:
    if impl in WENET_ROWS:
        sys.path.insert(0, os.path.abspath(args.anchors))
        import wenet_import

        encoder_class, _, _ = wenet_import.load_conformer_encoder(args.wenet_root)
        config = dict(wenet_import.CONFIG_12x256, use_sdpa=WENET_ROWS[impl])
        if args.positional == "rope":  # WeNet's own rotary attention, same model as echoic's
            config.update(
                pos_enc_layer_type="rope_pos", selfattention_layer_type="rope_abs_selfattn"
            )
        return encoder_class(**config)
    if args.recipe:  # a recipe's encoder, as it trains
        recipe = yaml.safe_load(Path(args.recipe).read_text())
        config = ConformerConfig(**recipe["model"]["encoder"]["conformer"])
    else:
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
    if impl == "echoic_compiled" and not compile_blocks(list(encoder.blocks), torch.device("cpu")):
        raise SystemExit("torch.compile is unavailable here (see the warning above)")
    return encoder


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def split_row(row: str) -> tuple[str, str]:
    """'wenet_sdpa_bf16' -> ('wenet_sdpa', 'bf16'); 'echoic' -> ('echoic', 'fp32')."""
    for precision in PRECISIONS[1:]:
        if row.endswith("_" + precision):
            return row[: -len(precision) - 1], precision
    return row, "fp32"


def _timed(fn, repeats: int) -> float:
    """Median seconds of fn() (forward + backward), after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _backward(make):
    def run():
        out = make()
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return run


def components(model: torch.nn.Module, impl: str, feats, lengths) -> dict[str, float]:
    """Milliseconds per training step of each component, timed alone (fwd + bwd) at
    the step's shapes and multiplied by its count per step."""
    torch.manual_seed(0)
    if impl == "echoic":
        block = model.blocks[0]
        per_block = len(model.blocks)
        frames = int(model.subsampling.output_lengths(lengths)[0])
        x = torch.randn(BATCH, frames, model.output_dim, requires_grad=True)
        valid = torch.ones(BATCH, frames, dtype=torch.bool)
        positions = model.attention_positions(frames, x.device, x.dtype)
        parts = {
            "subsampling": (lambda: model.subsampling(feats, lengths), 1),
            "feed_forward": (lambda: block.ff_in(block.ff_in_norm(x)), 2 * per_block),
            "attention": (
                lambda: block.attn(*[block.attn_norm(x)] * 3, positions=positions),
                per_block,
            ),
            "conv_module": (lambda: block.conv(block.conv_norm(x), valid), per_block),
            "block": (lambda: block(x, valid, None, positions), per_block),
        }
    else:
        layer = model.encoders[0]
        per_block = len(model.encoders)
        masks = torch.ones(BATCH, 1, FRAMES, dtype=torch.bool)
        with torch.no_grad():
            x, pos_emb, sub_masks = model.embed(feats, masks)
        x = torch.randn_like(x).requires_grad_()
        # With use_sdpa WeNet's encoder turns the attention mask into an additive bias
        # before its layers (nothing is padded here: all zeros); the conv mask stays bool.
        att_mask = torch.zeros_like(sub_masks, dtype=x.dtype) if model.use_sdpa else sub_masks
        parts = {
            "subsampling": (lambda: model.embed(feats, masks), 1),
            "feed_forward": (
                lambda: layer.feed_forward_macaron(layer.norm_ff_macaron(x)),
                2 * per_block,
            ),
            "attention": (
                lambda: layer.self_attn(*[layer.norm_mha(x)] * 3, att_mask, pos_emb),
                per_block,
            ),
            "conv_module": (
                lambda: layer.conv_module(layer.norm_conv(x), sub_masks),
                per_block,
            ),
            "block": (lambda: layer(x, att_mask, pos_emb, sub_masks), per_block),
        }
    out = {name: _timed(_backward(make), 5) * count * 1000 for name, (make, count) in parts.items()}
    out["block_rest"] = out["block"] - (out["feed_forward"] + out["attention"] + out["conv_module"])
    # The trainer's optimizer: fused AdamW over every parameter, gradients present.
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    out["optimizer"] = _timed(optimizer.step, 5) * 1000
    return {name: round(ms, 1) for name, ms in out.items()}


def profile(model, feats, lengths) -> list[list]:
    """torch.profiler over one step: the top operators by self CPU time (ms, calls)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        out, _ = model(feats, lengths)
        out.sum().backward()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [[e.key, round(e.self_cpu_time_total / 1000, 1), e.count] for e in events[:12]]


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    impl, precision = split_row(args.impl)
    model = build(impl, args).train()
    feats = torch.randn(BATCH, FRAMES, FEATURES)
    lengths = torch.full((BATCH,), FRAMES)
    base = maxrss_mb()
    times = []
    for step in range(args.warmup + args.repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with autocast(precision):
            out, _ = model(feats, lengths)
        out.float().sum().backward()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {
        "frames_per_s": BATCH * FRAMES / statistics.median(times),
        "peak_mb": maxrss_mb() - base,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": [round(t, 3) for t in times],
    }
    if args.profile:
        result["top_ops_ms"] = profile(model, feats, lengths)
        result["components_ms"] = components(
            model, "echoic" if impl == "echoic" else "wenet", feats, lengths
        )
    return result


def _run(row: str, args, extra: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return run_worker(__file__, "encoder", row, extra, env, args.timeout)


def _summary(runs: list[dict]) -> dict:
    steps = [t for run in runs for t in run["step_s"]]
    fps = sorted(BATCH * FRAMES / t for t in steps)
    return {
        "frames_per_s": round(BATCH * FRAMES / statistics.median(steps), 1),
        "frames_per_s_min": round(fps[0], 1),
        "frames_per_s_max": round(fps[-1], 1),
        "peak_mb": round(statistics.median(run["peak_mb"] for run in runs), 1),
        "params_m": round(runs[0]["params_m"], 2),
        "step_s": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", help=argparse.SUPPRESS)  # a worker's row
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per row")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", default="fp32", help="comma list of fp32, bf16")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd echoic rows")
    parser.add_argument("--profile", action="store_true", help="where a step's time goes")
    parser.add_argument("--positional", choices=["rel_pos", "rope"], default="rel_pos")
    parser.add_argument(
        "--recipe", help="measure this recipe YAML's Conformer instead of 12 x 256 (echoic only)"
    )
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
    if args.recipe and (args.wenet_root or args.profile):
        parser.error("--recipe measures echoic alone: leave out --wenet-root and --profile")
    precisions = args.precision.split(",")
    if unknown := set(precisions) - set(PRECISIONS):
        parser.error(f"--precision: unknown {sorted(unknown)}; choose from {list(PRECISIONS)}")
    impls = ["echoic", *(["echoic_compiled"] if args.compile else [])]
    impls += SDPA_MODES[args.wenet_sdpa] if args.wenet_root else []
    extra = list(sys.argv[1:])
    if args.profile:  # one fp32 eager process per implementation
        result = {"bench": "encoder_profile", "threads": args.threads}
        for impl in [i for i in impls if i != "echoic_compiled"]:
            run = _run(impl, args, extra)
            result[impl] = {
                "frames_per_s": round(run["frames_per_s"], 1),
                "components_ms": run["components_ms"],
                "top_ops_ms": run["top_ops_ms"],
            }
        result.update(torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count())
        print(json.dumps(result))
        return
    rows = [impl + ("" if p == "fp32" else "_" + p) for p in precisions for impl in impls]
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for _ in range(args.rounds):
        for row in rows:
            runs[row].append(_run(row, args, extra))
    summaries = {row: _summary(r) for row, r in runs.items()}
    result = {
        "bench": "encoder_train_step",
        "batch": BATCH,
        "frames": FRAMES,
        "threads": args.threads,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "encoder": args.recipe or "12 x 256",
        "positional": args.positional,
        "gradient_checkpointing": args.checkpointing,
        "rows": summaries,
    }
    echoic = summaries.get("echoic")
    for row in ("wenet", "wenet_sdpa"):
        if echoic and row in summaries:
            suffix = "_sdpa" if WENET_ROWS[row] else ""
            result[f"speedup{suffix}"] = round(
                echoic["frames_per_s"] / summaries[row]["frames_per_s"], 3
            )
            result[f"memory_ratio{suffix}"] = round(
                echoic["peak_mb"] / summaries[row]["peak_mb"], 3
            )
    wenet_rows = [r for r in rows if r.startswith("wenet")]
    if wenet_rows:
        best_echoic = max(
            (r for r in rows if r.startswith("echoic")), key=lambda r: summaries[r]["frames_per_s"]
        )
        best_wenet = max(wenet_rows, key=lambda r: summaries[r]["frames_per_s"])
        result.update(
            best_echoic=best_echoic,
            best_wenet=best_wenet,
            best_speedup=round(
                summaries[best_echoic]["frames_per_s"] / summaries[best_wenet]["frames_per_s"], 3
            ),
            best_memory_ratio=round(
                summaries[best_echoic]["peak_mb"] / summaries[best_wenet]["peak_mb"], 3
            ),
        )
    result.update(torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
