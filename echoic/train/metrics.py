"""Metric sums over a logging window, and where they are written.

Sums and counts (see echoic.models.contract) are added over micro-batches, summed
across ranks and divided once when a line is written: averages are exact whatever
the batches and ranks. `metrics.jsonl` has one JSON object per line:

    {"split": "train", "step": 100, "epoch": 0, "lr": ..., "loss": ..., "loss_ctc": ..., ...}
    {"split": "dev", ...}
    {"split": "system", "step": 100, "frames_per_s": ..., "peak_rss_mb": ..., "elapsed_s": ...}

`train` and `dev` lines depend only on the computation, so a resumed run writes them
byte for byte as an uninterrupted one would; timings and memory, which cannot, are
on `system` lines. Metrics a model does not have are null, never 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from echoic.models.contract import Metric
from echoic.train.distributed import Runtime, all_reduce_sum


class MetricSums:
    """Per-key (total, weight) over a window, for a fixed set of keys (a model's
    `metric_units`); a key with no weight yet (a model without that head, or a window
    with no data) averages to None."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = list(keys)  # the declaration's order: every rank packs them alike
        self.sums: dict[str, list[float]] = {k: [0.0, 0.0] for k in self.keys}

    def add(self, metrics: dict[str, Metric | None]) -> None:
        unknown = set(metrics) - set(self.sums)
        if unknown:
            raise ValueError(f"metrics {sorted(unknown)} are not among {self.keys}")
        for key, value in metrics.items():
            if value is not None:
                self.sums[key][0] += value.total
                self.sums[key][1] += value.weight

    def reduced(self, runtime: Runtime | None) -> dict[str, float | None]:
        """Averages over the window, summed across ranks first unless `runtime` is None.
        Distributed, it is a collective of the same size on every rank whatever the
        rank's data (even none): a rank that skipped it would leave the others waiting."""
        packed = torch.tensor(
            [self.sums[k][i] for k in self.keys for i in (0, 1)], dtype=torch.float64
        )
        if runtime is not None:
            packed = all_reduce_sum(packed.to(runtime.device), runtime).cpu()
        values: dict[str, float | None] = {}
        for index, key in enumerate(self.keys):
            total, weight = float(packed[2 * index]), float(packed[2 * index + 1])
            values[key] = total / weight if weight else None
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: list(v) for k, v in self.sums.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sums = state["sums"]
        if set(sums) != set(self.keys):
            raise ValueError(f"metric sums for {sorted(sums)}, expected {sorted(self.keys)}")
        self.sums = {k: list(sums[k]) for k in self.keys}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it visible
    return value


class MetricsLog:
    """Appends lines to metrics.jsonl and mirrors numbers to TensorBoard (rank 0 only)."""

    def __init__(
        self, exp_dir: Path, *, enabled: bool, resume_offset: int | None, resume_step: int
    ) -> None:
        self.path = exp_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_offset is None:
            self.path.write_text("")
        else:  # drop what the interrupted run wrote after its checkpoint
            with self.path.open("r+b") as stream:
                stream.truncate(resume_offset)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events the interrupted run logged past the checkpoint.
        self.writer = SummaryWriter(
            str(exp_dir / "tensorboard"), purge_step=resume_step + 1 if resume_offset else None
        )

    def offset(self) -> int:
        return self.path.stat().st_size if self.enabled else 0

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as stream:
            stream.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        split, step = record["split"], record["step"]
        for key, value in record.items():
            if key not in ("split", "step", "epoch") and isinstance(value, int | float):
                self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
