"""The one step contract every model follows, so a trainer never special-cases a family.

`model(batch)` returns a `StepOutput`:

- `loss`: the differentiable SUM over the batch's utterances of the weighted head
  losses. The trainer divides the accumulated gradients once by the total `weight`
  over all micro-batches and ranks, so the update is the exact per-utterance mean
  whatever the batch is split into.
- `weight`: the number of utterances `loss` sums over: the batch less `dropped`.
- `dropped`: utterances the model had to leave out of the loss and the metrics, by
  batch row, each with a short reason (`no_ctc_alignment`: more tokens than CTC can
  place in the encoder's frames). They are skips like a missing audio file: the
  trainer counts and reports them, whatever the model.
- `metrics`: exactly the keys the model declared in `metric_units`, each a `Metric`
  (a batch sum and the count it sums over) or None when the model has no such head.
  The same keys, and the same None-ness, in train and eval mode and for every batch.

Averages are exact: sums and counts are added over batches and ranks and divided
once, at report time. A missing value is None, never a fake 0.0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

Unit = Literal["utterances", "tokens", "frames"]
UTTERANCES: Unit = "utterances"
TOKENS: Unit = "tokens"
FRAMES: Unit = "frames"


@dataclass(frozen=True)
class Metric:
    """A batch sum and what it sums over; its value is total / weight."""

    total: float
    weight: float
    unit: Unit

    @property
    def value(self) -> float:
        return self.total / self.weight if self.weight else float("nan")

    def __add__(self, other: Metric) -> Metric:
        if other.unit != self.unit:
            raise ValueError(f"cannot add a metric in {other.unit} to one in {self.unit}")
        return Metric(self.total + other.total, self.weight + other.weight, self.unit)


def metric(total: torch.Tensor | float, weight: torch.Tensor | float, unit: Unit) -> Metric:
    """A Metric from tensors or numbers (detached; one sync point per value)."""
    return Metric(float(total), float(weight), unit)


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, differentiable: the sum over utterances
    weight: int  # utterances the loss sums over (the batch less `dropped`)
    metrics: dict[str, Metric | None]
    dropped: dict[int, str] = field(default_factory=dict)  # batch row -> why it was left out


class ContractError(AssertionError):
    """A model returned metrics other than the ones it declared."""


def check_step_output(declared: Mapping[str, Unit], output: StepOutput) -> None:
    """Fail loudly (in tests, and on a trainer's first step) when a forward's metrics
    differ from the declaration: a key added, missing, or in another unit."""
    got = set(output.metrics)
    if got != set(declared):
        extra = sorted(got - set(declared))
        missing = sorted(set(declared) - got)
        raise ContractError(
            f"metrics differ from the declaration: undeclared {extra}, missing {missing}"
        )
    for name, value in output.metrics.items():
        if value is not None and value.unit != declared[name]:
            raise ContractError(f"metric {name!r} is in {value.unit}, declared in {declared[name]}")
    if output.loss.dim() != 0:
        raise ContractError(f"loss must be a scalar, got shape {tuple(output.loss.shape)}")
