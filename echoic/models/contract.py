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

Beyond the step, the trainer and decoding call a model only through `TrainableModel`
(below) and, for what some families can do and others cannot, the small capability
protocols after it, checked with `isinstance`, never by probing for attributes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from echoic.data.batch import Batch
    from echoic.data.features import InputSpec

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


@runtime_checkable
class TrainableModel(Protocol):
    """Everything the trainer and decoding may ask of a model, whatever its family.

    Anything else (a family's heads, its encoder's parts) is the family's own business:
    nothing outside the family's module reads it."""

    metric_units: Mapping[str, Unit]  # the StepOutput keys, declared once per family

    @property
    def input_spec(self) -> InputSpec:
        """What the data pipeline must produce: fbank with these options, or waveform."""

    def __call__(self, batch: Batch) -> StepOutput: ...

    def start_step(self, step: int) -> None:
        """Called before optimizer step `step + 1` (and on resume)."""

    def parameter_groups(self) -> list[dict]:
        """The optimizer's groups, each with an `lr_scale`; never-trained parameters in none."""

    @property
    def unfreezes_during_training(self) -> bool:
        """Whether the trained set grows during training (DDP fixes it at wrap time)."""

    def token_indexed_parameters(self) -> list[str]:
        """State-dict keys whose first dimension is indexed by token id."""

    def input_frames_for(self, output_frames: int) -> int:
        """The fewest input frames (fbank frames, or 10 ms units of waveform for the
        sampler's budget) that give `output_frames` encoder frames."""

    def seconds_for_input_frames(self, frames: int) -> float:
        """The shortest audio, in seconds, whose input has `frames` frames."""

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the repeated blocks in backward (train.gradient_checkpointing)."""

    def repeated_blocks(self) -> Sequence[nn.Module]:
        """The stack of identical blocks: what FSDP shards one by one and train.compile
        compiles once; empty where there is none."""

    def decode_methods(self) -> tuple[str, ...]:
        """The decoding methods (echoic.decode.decoder.METHODS) this model can run, the
        default (most accurate) first; empty for a model that does not transcribe."""


@runtime_checkable
class TakesHotwords(Protocol):
    """A model trained to take a hotword list when it decodes (a contextual or SeACo
    Paraformer): `decode --hotwords` hands it the list instead of a context graph."""

    def hotword_memory(self, hotwords: tuple[torch.Tensor, torch.Tensor] | None) -> Any:
        """(K, L) token ids padded with -1 and (K,) lengths -> what the decoder attends to."""


@runtime_checkable
class ProbeFeatures(Protocol):
    """A pretraining model whose hidden states a downstream probe reads (train.probe)."""

    def probe_features(
        self, audio: torch.Tensor, audio_lens: torch.Tensor, layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveform (B, S), lengths (B,) -> hidden state `layer` (B, T, H), lengths (B,)."""


@runtime_checkable
class HuggingFaceExport(Protocol):
    """A model that `echoic export --format hf` writes as a HuggingFace folder."""

    def save_huggingface(self, out: Path) -> list[Path]:
        """Write the folder; returns the files written."""
