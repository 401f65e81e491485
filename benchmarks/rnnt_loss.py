"""RNN-T loss forward+backward on CPU: echoic against a plain autograd reference.

`rowscan` is written here as the baseline to beat: a Python loop over t, vectorised
over the batch, each row's u-recursion solved in closed form with torch.logcumsumexp
(alpha[t, u] = C[t, u] + logcumsumexp(alpha[t-1, u] + blank[t-1, u] - C[t, u]) with C the
cumulative emission log-probs of row t), differentiated by autograd.

Each implementation runs in a fresh process; peak memory is the rise of ru_maxrss
from just after the inputs exist to the end of the timed runs. Prints one JSON line:
echoic_ms, echoic_peak_mb, rowscan_ms, rowscan_peak_mb (median of --repeats), the
same for echoic_unfused (a full log-softmax first, to show what fusing saves), the
loss values of all (they must agree), and the settings.

    python benchmarks/rnnt_loss.py [--threads 2] [--B 8 --T 250 --U 40 --V 500]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from echoic.models.rnnt_loss import rnnt_loss


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


IMPLEMENTATIONS = {
    "echoic": echoic_loss,
    "echoic_unfused": echoic_unfused_loss,
    "rowscan": rowscan_loss,
}


def _inputs(batch, frames, u, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, frames, u + 1, vocab, generator=g)
    targets = torch.randint(1, vocab, (batch, u), generator=g)
    return logits, targets, torch.full((batch,), frames), torch.full((batch,), u)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    fn = IMPLEMENTATIONS[args.impl]
    small, *rest = _inputs(2, 6, 3, 8, 1)  # warm-up: lazy initialisation, not counted
    small.requires_grad_(True)
    fn(small, *rest).backward()
    logits, targets, frame_lens, target_lens = _inputs(args.B, args.T, args.U, args.V, args.seed)
    logits.requires_grad_(True)
    base = _maxrss_mb()
    times = []
    for step in range(args.warmup + args.repeats):
        logits.grad = None
        start = time.perf_counter()
        loss = fn(logits, targets, frame_lens, target_lens)
        loss.backward()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {
        "ms": 1000 * statistics.median(times),
        "peak_mb": _maxrss_mb() - base,
        "loss_per_utt": float(loss) / args.B,
        "grad_norm": float(logits.grad.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=list(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=250)
    parser.add_argument("--U", type=int, default=40)
    parser.add_argument("--V", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(worker(args)))
        return
    result = {
        "bench": "rnnt_loss",
        "B": args.B,
        "T": args.T,
        "U": args.U,
        "V": args.V,
        "dtype": "float32",
        "threads": args.threads,
        "repeats": args.repeats,
    }
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for name in IMPLEMENTATIONS:
        command = [sys.executable, __file__, "--impl", name, *sys.argv[1:]]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        measured = json.loads(out.strip().splitlines()[-1])
        result[f"{name}_ms"] = round(measured["ms"], 1)
        result[f"{name}_peak_mb"] = round(measured["peak_mb"], 1)
        result[f"{name}_loss_per_utt"] = round(measured["loss_per_utt"], 4)
        result[f"{name}_grad_norm"] = round(measured["grad_norm"], 4)
    result["logits_mb"] = round(args.B * args.T * (args.U + 1) * args.V * 4 / 2**20, 1)
    result["speed_ratio"] = round(result["echoic_ms"] / result["rowscan_ms"], 3)
    result["memory_ratio"] = round(result["echoic_peak_mb"] / result["rowscan_peak_mb"], 3)
    result.update(torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
