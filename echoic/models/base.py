"""What every model family shares: a frontend and an encoder, and the members that the
trainer, decoding and export read from any model.

A family (echoic.models.asr, echoic.models.paraformer) subclasses `EncoderModel`, puts
its heads after the encoder, declares its `metric_units` once and returns a StepOutput
with exactly those keys. `EncoderModel` answers the rest of the contract
(echoic.models.contract.TrainableModel) from its frontend and encoder, so nothing
outside the family's module knows which family it is: the trainer calls only the
contract; decoding runs the methods the family's `decode_methods` names; `echoic
export` traces the family's `export_path` and names its `export_outputs`. The family's
config section derives from `FrontendEncoderSection` (below) and its entry in the
family table (echoic.models.model) says how it is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from echoic.data.batch import Batch
from echoic.data.dataset import DataConfig
from echoic.data.features import CmvnStats, InputSpec
from echoic.errors import EchoicError
from echoic.models.contract import Metric, StepOutput, Unit
from echoic.models.encoders import Encoder, EncoderConfig, subsampling_factor
from echoic.models.family import ModelSection
from echoic.models.frontend import FrontendConfig, build_frontend
from echoic.models.heads.ctc import NO_CTC_ALIGNMENT, CtcHead
from echoic.models.ssl import read_upstream


@dataclass(frozen=True)
class FrontendEncoderSection(ModelSection):
    """The config of a frontend -> encoder -> heads family: the fields and the cross-
    section rules every such family shares; each adds its heads."""

    frontend: FrontendConfig = FrontendConfig()
    encoder: EncoderConfig = EncoderConfig()

    @property
    def wants_cmvn(self) -> bool:
        fbank = self.frontend.fbank
        return fbank is not None and fbank.global_cmvn

    @property
    def waveform_input(self) -> str | None:
        return "an SSL frontend" if self.frontend.ssl is not None else None

    def check_data(self, data: DataConfig) -> None:
        super().check_data(data)
        fbank = self.frontend.fbank
        if data.feature_cache and fbank is not None and fbank.fbank.dither > 0:
            raise ValueError("data.feature_cache needs model.frontend.fbank.fbank.dither 0")

    def subsampling(self) -> int | None:
        """The encoder's subsampling factor with `auto` resolved."""
        try:
            if self.frontend.ssl is not None:
                frame_shift = read_upstream(self.frontend.ssl.path, hash_files=False).frame_shift
            else:
                frame_shift = self.frontend.fbank.fbank.frame_shift_ms / 1000
            return subsampling_factor(self.encoder.kind, frame_shift)
        except EchoicError:
            return None


@dataclass
class UsableInputs:
    """A batch's features and tokens without the utterances the model leaves out."""

    feats: torch.Tensor  # (B', T, F) or waveform, as the frontend gives
    lengths: torch.Tensor  # (B',)
    tokens: torch.Tensor  # (B', U')
    token_lens: torch.Tensor  # (B',)
    ids: list[str]  # the B' utterances
    dropped: dict[int, str]  # batch row -> why it was left out
    used: int  # utterances that count: 0 when every one was left out (then B' = B)


class EncoderModel(nn.Module):
    """frontend -> encoder; a family adds its heads and its forward."""

    metric_units: ClassVar[dict[str, Unit]]  # declared once per family
    # The exported graph's outputs in order (name -> what it holds), for export.json.
    export_outputs: ClassVar[dict[str, str]] = {
        "log_probs": "(B, T', V) float32 CTC log-probabilities, blank id 0",
        "out_lens": "(B,) int64 encoder frames per utterance",
    }

    def __init__(self, frontend: nn.Module, encoder: Encoder) -> None:
        super().__init__()
        self.frontend = frontend
        self.encoder = encoder

    @property
    def input_spec(self) -> InputSpec:
        return self.frontend.input_spec

    def start_step(self, step: int) -> None:
        """The trainer calls this before optimizer step `step + 1` (and on resume)."""
        self.frontend.start_step(step)

    @property
    def unfreezes_during_training(self) -> bool:
        """Whether the set of trained parameters grows during training (an SSL upstream
        unfrozen after N steps): DDP fixes that set when it wraps the model."""
        return getattr(self.frontend, "unfreezes_during_training", False)

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups, each with an `lr_scale`: the SSL upstream's
        trained parameters in a group of their own, everything else at scale 1. Never
        trained parameters (a frozen upstream) are in none."""
        upstream = []
        trained = getattr(self.frontend, "trained_upstream_parameters", None)
        if trained is not None:
            upstream = trained()
        fixed = set()
        ssl = getattr(self.frontend, "upstream", None)
        if ssl is not None:
            fixed = {id(p) for p in ssl.parameters()}
        rest = [p for p in self.parameters() if id(p) not in fixed]
        groups = [{"params": rest, "lr_scale": 1.0, "name": "model"}]
        if upstream:
            scale = self.frontend.config.lr_scale
            groups.append({"params": upstream, "lr_scale": scale, "name": "ssl_upstream"})
        return groups

    def token_indexed_parameters(self) -> list[str]:
        """State-dict keys whose first dimension is indexed by token id (rows moved when
        fine-tuning with another vocabulary): each family lists its own."""
        raise NotImplementedError

    def decode_methods(self) -> tuple[str, ...]:
        """The decoding methods the family's heads allow, the default first."""
        raise NotImplementedError

    def input_frames_for(self, output_frames: int) -> int:
        return self.encoder.subsampling.input_frames_for(output_frames)

    def seconds_for_input_frames(self, frames: int) -> float:
        return self.frontend.seconds_for_frames(frames)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = enabled

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.encoder.blocks)

    def export_path(self) -> nn.Module:
        """What `echoic export` traces: (inputs, lengths) -> the tensors named in
        `export_outputs`, with no branch that depends on the data. By default the
        encoder + CTC path; a family without CTC provides its own."""
        return CtcPath(self)

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> encoder output (B, T', D), lengths (B,)."""
        feats, lengths = self.frontend(batch)
        return self.encoder(feats, lengths)

    def usable_inputs(self, batch: Batch, ctc: CtcHead | None) -> UsableInputs:
        """The frontend's output and the tokens of the utterances the model can use: with
        a CTC head, not those with more tokens than CTC can place in the encoder's frames
        (a transcript too long for its audio). Their CTC loss has no alignment, and
        keeping them for the other heads alone would weigh them unlike every other
        utterance. They are left out before the encoder, so they change nothing,
        BatchNorm statistics included. When every one is left out, all are kept, so the
        batch still runs (see step_output)."""
        feats, lengths = self.frontend(batch)
        tokens, token_lens, ids = batch.tokens, batch.token_lens, batch.ids
        dropped = _ctc_unusable(self.encoder, ctc, lengths, tokens, token_lens)
        used = batch.size - len(dropped)
        if dropped and used:
            keep = torch.ones(batch.size, dtype=torch.bool)
            keep[list(dropped)] = False
            keep = keep.to(lengths.device)
            feats, lengths, tokens, token_lens = (
                t[keep] for t in (feats, lengths, tokens, token_lens)
            )
            tokens = tokens[:, : int(token_lens.max())]
            ids = [utt for row, utt in enumerate(ids) if row not in dropped]
        return UsableInputs(feats, lengths, tokens, token_lens, ids, dropped, used)


class CtcPath(nn.Module):
    """Frontend normalisation -> encoder -> CTC log-probabilities, tensors in and out."""

    def __init__(self, model: EncoderModel) -> None:
        super().__init__()
        ctc = getattr(model, "ctc", None)
        if ctc is None:
            raise EchoicError("export covers the encoder + CTC path; this model has no CTC head")
        self.frontend, self.encoder, self.ctc = model.frontend, model.encoder, ctc

    def forward(
        self, feats: torch.Tensor, feat_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feats, lens = self.frontend.export_features(feats, feat_lens)
        encoded, lens = self.encoder(feats, lens, static=True)
        return self.ctc.log_probs(encoded), lens


def build_frontend_encoder(
    frontend_config: FrontendConfig, encoder_config: EncoderConfig, cmvn: CmvnStats | None
) -> tuple[nn.Module, Encoder]:
    """The frontend, with the CMVN statistics of `echoic prepare` for fbank, and the
    encoder built on its output width and frame shift."""
    frontend = build_frontend(frontend_config)
    if cmvn is not None:
        frontend.set_cmvn(cmvn)
    encoder = Encoder(
        encoder_config.kind,
        input_dim=frontend.output_dim,
        frame_shift=frontend.frame_shift,
        input_source=frontend.output_source,
    )
    return frontend, encoder


def _ctc_unusable(
    encoder: Encoder,
    ctc: CtcHead | None,
    input_lens: torch.Tensor,
    tokens: torch.Tensor,
    token_lens: torch.Tensor,
) -> dict[int, str]:
    """(B,) input frames, (B, U) tokens, (B,) lengths -> {row: reason} for the
    utterances CTC cannot align (see EncoderModel.usable_inputs)."""
    if ctc is None:
        return {}
    frames = encoder.subsampling.output_lengths(input_lens)
    short = CtcHead.frames_needed(tokens, token_lens) > frames
    return dict.fromkeys(short.nonzero().flatten().tolist(), NO_CTC_ALIGNMENT)


def step_output(
    total: torch.Tensor, used: int, metrics: dict[str, Metric | None], dropped: dict[int, str]
) -> StepOutput:
    """The StepOutput of a batch of which `used` utterances count. With none (every one
    left out), the whole batch still ran, so that every parameter gets a (zero) gradient
    as distributed training needs, and nothing of it counts."""
    if not used:
        total = total * 0.0
        metrics = {k: v if v is None else Metric(0.0, 0.0, v.unit) for k, v in metrics.items()}
    return StepOutput(loss=total, weight=used, metrics=metrics, dropped=dropped)
