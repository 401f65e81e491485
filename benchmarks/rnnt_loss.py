"""RNN-T loss forward+backward on CPU: echoic against a plain autograd reference and,
when they are importable, the peers' compiled losses.

`rowscan` is written here as the baseline to beat: a Python loop over t, vectorised
over the batch, each row's u-recursion solved in closed form with torch.logcumsumexp
(alpha[t, u] = C[t, u] + logcumsumexp(alpha[t-1, u] + blank[t-1, u] - C[t, u]) with C the
cumulative emission log-probs of row t), differentiated by autograd.

Optional peer rows (skipped, with the import error as the reason, when the library is
missing; build both with ../shared/anchors/build_rnnt_libs.sh into a separate venv):
  fast_rnnt             k2's fast_rnnt.rnnt_loss, the full (un-pruned) lattice
  optimized_transducer  optimized_transducer.transducer_loss on the packed lattice
                        (packing is part of its timed call, as its users must pack)

Each implementation runs in a fresh process; processes alternate between
implementations for --rounds rounds, because these machines are noisy and only
same-run ratios mean anything. Times are the median over all timed steps of all
rounds, peak memory (the rise of ru_maxrss from just after the inputs exist to the
end of the timed runs) the median over rounds. Before timing, every implementation is
checked against echoic in this process on a small batch with unequal lengths: loss
and gradient differences go to `check`, and a disagreement stops the benchmark.

Prints one JSON line: {name}_ms, {name}_peak_mb, {name}_loss_per_utt, {name}_grad_norm
per measured row; speed_ratio and memory_ratio (echoic / rowscan) and
speed_ratio_{peer}, memory_ratio_{peer} (echoic / peer: below 1 means echoic is
faster or smaller); `skipped` (row -> reason) and the settings.

    python benchmarks/rnnt_loss.py [--threads 2] [--rounds 3] [--B 8 --T 250 --U 40 --V 500]
    PYTHONPATH=. PEERS_VENV/bin/python benchmarks/rnnt_loss.py  # a venv where the peers import
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time

import torch

from echoic.models.rnnt_loss import rnnt_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is not a package
from _common import maxrss_mb, run_worker

# Loss and gradient differences to echoic beyond these mean a row computes something else.
LOSS_TOLERANCE = 1e-3  # per utterance, nats
GRAD_TOLERANCE = 1e-4  # largest absolute difference of one gradient element


def rowscan_loss(logits, targets, logit_lengths, target_lengths, blank=0):
    """Sum over the batch of -log P, by a row scan that autograd differentiates."""
    log_probs = torch.log_softmax(logits, dim=-1)
    batch, frames, u1, _ = log_probs.shape
    blank_lp = log_probs[..., blank]
    index = targets.clamp(min=0)[:, None, :, None].expand(batch, frames, u1 - 1, 1)
    emit_lp = log_probs[:, :, :-1].gather(3, index).squeeze(3)
    cumulative = torch.cat([emit_lp.new_zeros(batch, frames, 1), emit_lp.cumsum(dim=2)], dim=2)
    row = cumulative[:, 0]
    rows = [row]
    for t in range(1, frames):
        arrived = row + blank_lp[:, t - 1]
        row = cumulative[:, t] + torch.logcumsumexp(arrived - cumulative[:, t], dim=1)
        rows.append(row)
    alpha = torch.stack(rows, dim=1)
    b = torch.arange(batch)
    last_t, last_u = logit_lengths - 1, target_lengths
    return -(alpha[b, last_t, last_u] + blank_lp[b, last_t, last_u]).sum()


def echoic_loss(logits, targets, logit_lengths, target_lengths):
    """The reduced-memory path: log-softmax fused, only blank/target log-probs gathered."""
    return rnnt_loss(logits, targets, logit_lengths, target_lengths, reduction="sum")


def echoic_unfused_loss(logits, targets, logit_lengths, target_lengths):
    """The same lattice over a full log-softmax tensor (autograd differentiates it)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    return rnnt_loss(
        log_probs, targets, logit_lengths, target_lengths, reduction="sum", fused_log_softmax=False
    )


def fast_rnnt_loss(logits, targets, logit_lengths, target_lengths):
    """k2's fast_rnnt.rnnt_loss over the full lattice; it log-normalises the logits itself."""
    import fast_rnnt

    # boundary rows are (begin_symbol, begin_frame, end_symbol, end_frame)
    boundary = torch.zeros(logits.shape[0], 4, dtype=torch.int64)
    boundary[:, 2] = target_lengths
    boundary[:, 3] = logit_lengths
    return fast_rnnt.rnnt_loss(
        logits=logits, symbols=targets, termination_symbol=0, boundary=boundary, reduction="sum"
    )


def optimized_transducer_loss(logits, targets, logit_lengths, target_lengths):
    """optimized_transducer.transducer_loss: it takes each utterance's (T_b * (U_b+1), V)
    lattice rows concatenated, so the padded batch is packed first, inside the timing."""
    import optimized_transducer

    vocab = logits.shape[-1]
    lengths = zip(logit_lengths.tolist(), target_lengths.tolist())
    rows = [logits[b, :t, : u + 1].reshape(-1, vocab) for b, (t, u) in enumerate(lengths)]
    packed = torch.cat(rows)
    return optimized_transducer.transducer_loss(
        logits=packed,
        targets=targets.int(),
        logit_lengths=logit_lengths.int(),
        target_lengths=target_lengths.int(),
        blank=0,
        reduction="sum",
        from_log_softmax=False,
    )


IMPLEMENTATIONS = {
    "echoic": echoic_loss,
    "echoic_unfused": echoic_unfused_loss,
    "rowscan": rowscan_loss,
    "fast_rnnt": fast_rnnt_loss,
    "optimized_transducer": optimized_transducer_loss,
}
# Rows that need a library outside echoic's dependencies: row -> module to import.
PEERS = {"fast_rnnt": "fast_rnnt", "optimized_transducer": "optimized_transducer"}


def missing_peer(name: str) -> str | None:
    """Why the row `name` cannot run here (its import error), or None when it can."""
    if name not in PEERS:
        return None
    try:
        importlib.import_module(PEERS[name])
    except ImportError as error:  # a missing module, or a build against another torch
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def _inputs(batch, frames, u, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, frames, u + 1, vocab, generator=g)
    targets = torch.randint(1, vocab, (batch, u), generator=g)
    return logits, targets, torch.full((batch,), frames), torch.full((batch,), u)


def agreement(names: list[str], seed: int = 0) -> dict:
    """Loss and gradient of each row against echoic's on a small batch with unequal lengths.

    Returns {name: {"loss_diff": per-utterance |difference|, "grad_max_diff": largest
    element |difference|}}, or {name: {"error": one line}} for a row that raised. The
    padding past each utterance's lengths gets a zero gradient from every
    implementation, so the whole gradients are compared.
    """
    logits, targets, frame_lens, target_lens = _inputs(4, 30, 7, 20, seed)
    frame_lens = torch.tensor([30, 17, 25, 1])
    target_lens = torch.tensor([7, 3, 1, 2])  # fast_rnnt asserts at least one symbol

    def run(fn):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, targets, frame_lens, target_lens)
        loss.backward()
        return float(loss.detach()) / len(x), x.grad

    reference_loss, reference_grad = run(echoic_loss)
    report = {}
    for name in names:
        try:
            loss, grad = run(IMPLEMENTATIONS[name])
        except Exception as error:  # a peer's own assertion: report the row, run the rest
            report[name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
            continue
        report[name] = {
            "loss_diff": abs(loss - reference_loss),
            "grad_max_diff": float((grad - reference_grad).abs().max()),
        }
    return report


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    fn = IMPLEMENTATIONS[args.impl]
    small, *rest = _inputs(2, 6, 3, 8, 1)  # warm-up: lazy initialisation, not counted
    small.requires_grad_(True)
    fn(small, *rest).backward()
    logits, targets, frame_lens, target_lens = _inputs(args.B, args.T, args.U, args.V, args.seed)
    logits.requires_grad_(True)
    base = maxrss_mb()
    times = []
    for step in range(args.warmup + args.repeats):
        logits.grad = None
        start = time.perf_counter()
        loss = fn(logits, targets, frame_lens, target_lens)
        loss.backward()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {
        "times_s": times,
        "peak_mb": maxrss_mb() - base,
        "loss_per_utt": float(loss) / args.B,
        "grad_norm": float(logits.grad.norm()),
    }


def _run(name: str, args, env: dict) -> dict:
    """One fresh worker process for row `name`; a failure is a one-line SystemExit."""
    return run_worker(__file__, "rnnt_loss", name, sys.argv[1:], env, args.timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=list(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    parser.add_argument(
        "--impls",
        default=",".join(IMPLEMENTATIONS),
        help="comma-separated rows to run (echoic is always run: the ratios need it)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=250)
    parser.add_argument("--U", type=int, default=40)
    parser.add_argument("--V", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per row")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per worker process")
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(worker(args)))
        return
    wanted = ["echoic"] + [n for n in args.impls.split(",") if n and n != "echoic"]
    unknown = [n for n in wanted if n not in IMPLEMENTATIONS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(IMPLEMENTATIONS)}")
    skipped = {n: why for n in wanted if (why := missing_peer(n))}
    names = [n for n in wanted if n not in skipped]
    torch.set_num_threads(args.threads)
    check = agreement([n for n in names if n != "echoic"])
    for name, c in list(check.items()):
        if "error" in c:
            skipped[name] = f"failed on the check batch: {c.pop('error')}"
            del check[name]
    names = [n for n in names if n not in skipped]
    wrong = {
        n: c
        for n, c in check.items()
        if c["loss_diff"] > LOSS_TOLERANCE or c["grad_max_diff"] > GRAD_TOLERANCE
    }
    if wrong:
        raise SystemExit(f"rnnt_loss: rows disagree with echoic: {json.dumps(wrong)}")

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:  # alternate rows so that load changes hit all of them alike
            runs[name].append(_run(name, args, env))
    result = {
        "bench": "rnnt_loss",
        "B": args.B,
        "T": args.T,
        "U": args.U,
        "V": args.V,
        "dtype": "float32",
        "threads": args.threads,
        "repeats": args.repeats,
        "rounds": args.rounds,
    }
    for name, measured in runs.items():
        last = measured[-1]
        step_s = [t for m in measured for t in m["times_s"]]
        result[f"{name}_ms"] = round(1000 * statistics.median(step_s), 1)
        result[f"{name}_peak_mb"] = round(statistics.median(m["peak_mb"] for m in measured), 1)
        result[f"{name}_loss_per_utt"] = round(last["loss_per_utt"], 4)
        result[f"{name}_grad_norm"] = round(last["grad_norm"], 4)
    result["logits_mb"] = round(args.B * args.T * (args.U + 1) * args.V * 4 / 2**20, 1)
    for name in names:
        if name.startswith("echoic"):
            continue
        # the rowscan ratios keep their original key names
        suffix = "" if name == "rowscan" else f"_{name}"
        result[f"speed_ratio{suffix}"] = round(result["echoic_ms"] / result[f"{name}_ms"], 3)
        peak = result[f"{name}_peak_mb"]
        memory = round(result["echoic_peak_mb"] / peak, 3) if peak > 0 else None
        result[f"memory_ratio{suffix}"] = memory
    result["check"] = {n: {k: float(f"{v:.2e}") for k, v in c.items()} for n, c in check.items()}
    result["skipped"] = skipped
    result.update(torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
