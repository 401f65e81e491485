"""The HuBERT family: masked prediction of frame-level cluster labels (arXiv 2106.07447).

The backbone is `transformers.HubertModel` built from a `HubertConfig` (convolutional
waveform feature extractor -> projection -> transformer), so the exported HuggingFace
folder is this model by construction. Around it echoic adds what pretraining needs:

- span masking drawn from (seed, epoch, utterance id), never from a global generator,
  so a resumed run masks exactly what an uninterrupted one does: each utterance gets
  int(mask_prob * frames / mask_length + u) span starts (u uniform in [0, 1)) drawn
  without replacement from its own frames (padding never), each span mask_length
  frames; spans may overlap, so about half the frames are masked at the defaults
  (fairseq's rule);
- the prediction head: the last hidden states projected to `final_dim`, cosine
  similarity with one learned embedding per cluster, divided by a temperature;
- cross-entropy on masked frames (`loss_m`) and on unmasked ones (`loss_u`),
  weighted. Each utterance contributes the mean over its frames, so the step loss is a
  sum over utterances as the metrics contract wants.

Targets come from `echoic kmeans` (echoic.pretrain.units): the batch's tokens are cluster
ids + 2 (a `units` tokenizer), one per 20 ms frame. An utterance whose label count
differs from its frames by more than one (labels made for another frame rate) is left
out and counted; a difference of one (rounding at the end) is cut.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from echoic.config import from_dict
from echoic.data.batch import Batch
from echoic.data.dataset import DataConfig
from echoic.data.features import CmvnStats, InputSpec
from echoic.data.tokenizer import UnitTokenizer
from echoic.errors import ConfigError
from echoic.models.base import step_output
from echoic.models.contract import FRAMES, UTTERANCES, Metric, StepOutput, Unit, metric
from echoic.models.encoders import EncoderConfig
from echoic.models.family import ModelSection
from echoic.models.frontend import FrontendConfig
from echoic.models.layers import strided_input_length, strided_lengths
from echoic.models.ssl import _normalize
from echoic.seeding import make_rng

log = logging.getLogger(__name__)

LABEL_MISMATCH = "label_length_mismatch"
SAMPLE_RATE = 16000  # the backbone's input rate, what `echoic kmeans` labels are made at


@dataclass(frozen=True)
class HubertBackboneConfig:
    """transformers.HubertConfig's settings that echoic exposes (HuBERT Base's values)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    # (channels, kernel, stride) of each conv layer; the default's stride is 320 samples
    # (20 ms) and receptive field 400 (25 ms), what `echoic kmeans` labels are aligned to
    conv_layers: list[list[int]] = field(
        default_factory=lambda: [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
    )
    conv_pos_kernel: int = 128  # the convolutional positional embedding
    conv_pos_groups: int = 16
    dropout: float = 0.1  # hidden, attention and activation dropout
    # Pre-LN transformer (HuggingFace's do_stable_layer_norm, HuBERT Large's layout): a
    # final layer norm, and steadier training for small models and batches than post-LN.
    layer_norm_first: bool = True

    def __post_init__(self) -> None:
        if any(len(layer) != 3 or min(layer) < 1 for layer in self.conv_layers):
            raise ValueError("conv_layers must list [channels, kernel, stride] triples")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")


@dataclass(frozen=True)
class HubertPretrainConfig:
    backbone: HubertBackboneConfig = HubertBackboneConfig()
    final_dim: int = 256  # the projection the cluster embeddings are compared in
    mask_prob: float = 0.8  # span starts per frame x mask_length (fairseq's mask_prob)
    mask_length: int = 10  # frames per span
    logit_temp: float = 0.1  # cosine similarity / logit_temp
    masked_weight: float = 1.0  # loss_m's weight in loss
    unmasked_weight: float = 0.0  # loss_u's weight (HuBERT Base: 0)
    # The convolutional feature extractor's learning rate relative to the rest. fairseq
    # scales its gradient by 0.1 (feature_grad_mult), which Adam's normalised update
    # undoes; a smaller rate is what slows it down.
    extractor_lr_scale: float = 1.0
    # The learned vector that replaces masked frames starts as normal(0, this std);
    # None keeps transformers' uniform [0, 1), whose shared mean of 0.5 is large beside
    # features from std-0.02 layers (RMS 0.16 for a 64-channel extractor)
    mask_embedding_std: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_prob <= 1.0 or self.mask_length < 1:
            raise ValueError("mask_prob must be in [0, 1] and mask_length at least 1")
        if self.logit_temp <= 0:
            raise ValueError("logit_temp must be positive")
        if self.masked_weight < 0 or self.unmasked_weight < 0:
            raise ValueError("loss weights must not be negative")
        if self.masked_weight + self.unmasked_weight == 0:
            raise ValueError("masked_weight and unmasked_weight are both 0: nothing to learn")
        if self.extractor_lr_scale <= 0:
            raise ValueError("extractor_lr_scale must be positive")
        if self.mask_embedding_std is not None and self.mask_embedding_std < 0:
            raise ValueError("mask_embedding_std must not be negative")


@dataclass(frozen=True)
class HubertModelConfig(ModelSection):
    """The HuBERT family's `model` section: `hubert:` alone. Its waveform feature
    extractor and transformer are the backbone's (`hubert.backbone`), so there is no
    frontend, encoder or head section."""

    hubert: HubertPretrainConfig = HubertPretrainConfig()

    @classmethod
    def without_legacy_keys(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
        """Configs written before each family had its own section held a default
        frontend and encoder beside `hubert`: those mean nothing and go; anything
        else there is an error, as it always was."""
        for key, config in (("frontend", FrontendConfig), ("encoder", EncoderConfig)):
            if key in data and from_dict(config, data[key], f"{where}.{key}") != config():
                raise ConfigError(
                    "hubert has its own waveform feature extractor and transformer "
                    f"(model.hubert.backbone): remove {where}.frontend and {where}.encoder"
                )
            data.pop(key, None)
        return data

    @property
    def waveform_input(self) -> str | None:
        return "hubert (which masks its own frames)"

    @property
    def pretrains(self) -> bool:
        return True

    def check_data(self, data: DataConfig) -> None:
        super().check_data(data)
        if data.speed_perturb != [1.0]:
            raise ValueError(
                "hubert's labels are aligned to the audio as it is: set data.speed_perturb: [1.0]"
            )


def hf_config(config: HubertBackboneConfig):
    """The transformers.HubertConfig of a backbone config."""
    import transformers

    return transformers.HubertConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.ffn_dim,
        conv_dim=[c for c, _, _ in config.conv_layers],
        conv_kernel=[k for _, k, _ in config.conv_layers],
        conv_stride=[s for _, _, s in config.conv_layers],
        num_feat_extract_layers=len(config.conv_layers),
        num_conv_pos_embeddings=config.conv_pos_kernel,
        num_conv_pos_embedding_groups=config.conv_pos_groups,
        hidden_dropout=config.dropout,
        attention_dropout=config.dropout,
        activation_dropout=config.dropout,
        feat_proj_dropout=config.dropout,
        layerdrop=0.0,  # a skipped layer leaves parameters without gradients under DDP
        # Layer norm in each conv layer normalises over channels, so padding never changes
        # an utterance's features (group norm, HuBERT Base's, normalises over time).
        feat_extract_norm="layer",
        feat_proj_layer_norm=True,
        do_stable_layer_norm=config.layer_norm_first,
        conv_bias=config.layer_norm_first,
    )


def span_mask(
    lengths: list[int], mask_prob: float, mask_length: int, rngs: list[np.random.Generator]
) -> torch.Tensor:
    """(B,) valid frames, one generator per utterance -> (B, max length) bool, True where
    masked (see the module docstring). Padding is never masked; an utterance shorter than
    a span gets none."""
    mask = np.zeros((len(lengths), max(lengths, default=0)), dtype=bool)
    for row, (frames, rng) in enumerate(zip(lengths, rngs, strict=True)):
        starts_possible = frames - mask_length + 1
        draw = rng.random()  # drawn even when unused, so each utterance's stream is fixed
        if starts_possible < 1:
            continue
        count = min(int(mask_prob * frames / mask_length + draw), starts_possible)
        if count < 1:
            continue
        starts = rng.choice(starts_possible, count, replace=False)
        spans = (starts[:, None] + np.arange(mask_length)[None]).reshape(-1)
        mask[row, spans] = True
    return torch.from_numpy(mask)


class HubertPretrainModel(nn.Module):
    """forward(batch) -> StepOutput with exactly `metric_units`' keys:

    loss         masked_weight x loss_m + unmasked_weight x loss_u, per utterance
    loss_m       cross-entropy per masked frame (compare with log K, a uniform guess)
    loss_u       cross-entropy per unmasked frame
    acc_m        cluster accuracy on masked frames
    acc_u        cluster accuracy on unmasked frames
    th_accuracy  acc_m (the name every family reports)
    """

    metric_units: ClassVar[dict[str, Unit]] = {
        "loss": UTTERANCES,
        "loss_m": FRAMES,
        "loss_u": FRAMES,
        "acc_m": FRAMES,
        "acc_u": FRAMES,
        "th_accuracy": FRAMES,
    }
    unfreezes_during_training = False
    input_spec = InputSpec("waveform", SAMPLE_RATE)

    def __init__(self, config: HubertPretrainConfig, num_units: int) -> None:
        super().__init__()
        import transformers

        self.config = config
        self.num_units = num_units
        self.backbone = transformers.HubertModel(hf_config(config.backbone))
        if config.mask_embedding_std is not None:
            nn.init.normal_(self.backbone.masked_spec_embed, std=config.mask_embedding_std)
        # (kernel, stride) of each conv layer: samples to frames and back
        self.conv_layers = tuple((k, s) for _, k, s in config.backbone.conv_layers)
        self.final_proj = nn.Linear(config.backbone.hidden_size, config.final_dim)
        self.label_embeddings = nn.Parameter(torch.empty(num_units, config.final_dim))
        nn.init.uniform_(self.label_embeddings)
        log.info(
            "HuBERT targets: %d clusters; a uniform guess scores loss_m = log %d = %.3f",
            num_units,
            num_units,
            math.log(num_units),
        )

    def start_step(self, step: int) -> None:
        """Nothing changes with the step."""

    def num_frames(self, num_samples: torch.Tensor | int) -> torch.Tensor | int:
        """The backbone's frames for an utterance's samples (20 ms each by default)."""
        return strided_lengths(num_samples, self.conv_layers)

    def input_frames_for(self, output_frames: int) -> int:
        return output_frames  # no subsampling after the conv extractor's frames

    def seconds_for_input_frames(self, frames: int) -> float:
        return strided_input_length(frames, self.conv_layers) / SAMPLE_RATE

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.backbone.encoder.layers)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
        # (the old names warn); either works.
        backbone = type(self.backbone)
        for prefix in ("activation_checkpointing", "gradient_checkpointing"):
            if hasattr(backbone, f"{prefix}_enable"):
                on = getattr(self.backbone, f"is_{prefix}", False)
                if enabled:
                    getattr(self.backbone, f"{prefix}_enable")()
                elif on:
                    getattr(self.backbone, f"{prefix}_disable")()
                return
        raise AttributeError("gradient_checkpointing_enable")

    def decode_methods(self) -> tuple[str, ...]:
        return ()  # it predicts clusters, not text: fine-tune it (the ssl frontend) to decode

    def parameter_groups(self) -> list[dict]:
        scale = self.config.extractor_lr_scale
        if scale == 1.0:
            return [{"params": list(self.parameters()), "lr_scale": 1.0, "name": "model"}]
        extractor = list(self.backbone.feature_extractor.parameters())
        inside = {id(p) for p in extractor}
        rest = [p for p in self.parameters() if id(p) not in inside]
        return [
            {"params": rest, "lr_scale": 1.0, "name": "model"},
            {"params": extractor, "lr_scale": scale, "name": "feature_extractor"},
        ]

    def token_indexed_parameters(self) -> list[str]:
        return []  # label embeddings are indexed by cluster, which no tokenizer remaps

    def save_huggingface(self, out: Path) -> list[Path]:
        """Write the backbone as a HuggingFace folder that `HubertModel.from_pretrained`
        and echoic's `ssl` frontend load as they are: config.json, model.safetensors and
        a preprocessor config saying the input is normalised per utterance (as here).
        The prediction head (projection, cluster embeddings) is pretraining's alone."""
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out, safe_serialization=True)
        preprocessor = {
            "feature_extractor_type": "Wav2Vec2FeatureExtractor",
            "feature_size": 1,
            "sampling_rate": SAMPLE_RATE,
            "padding_value": 0.0,
            "padding_side": "right",
            "do_normalize": True,
            "return_attention_mask": True,
        }
        (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1) + "\n")
        return [out / "config.json", out / "model.safetensors", out / "preprocessor_config.json"]

    def probe_features(
        self, audio: torch.Tensor, audio_lens: torch.Tensor, layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded waveform (B, S), lengths (B,) -> hidden state `layer` (0: the first
        layer's input; None: the last, after the final layer norm of a pre-LN backbone)
        without masking, (B, T, H), and frame lengths (B,): what the downstream probe
        (echoic.train.probe) and fine-tuning through the ssl frontend see."""
        out = self._backbone(audio, audio_lens, output_hidden_states=layer is not None)
        hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]
        return hidden, self.num_frames(audio_lens)

    def _backbone(self, audio: torch.Tensor, audio_lens: torch.Tensor, **options):
        """The backbone on per-utterance normalised waveform, padding masked out."""
        attention = torch.arange(audio.shape[1], device=audio.device)[None] < audio_lens[:, None]
        return self.backbone(
            _normalize(audio, audio_lens), attention_mask=attention.long(), **options
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) last hidden states -> (B, T, K) cosine logits over the clusters."""
        projected = F.normalize(self.final_proj(hidden), dim=-1)
        embeddings = F.normalize(self.label_embeddings, dim=-1)
        return projected @ embeddings.T / self.config.logit_temp

    def forward(self, batch: Batch) -> StepOutput:
        audio, audio_lens = batch.audio, batch.audio_lens
        frame_lens = self.num_frames(audio_lens)
        labels = batch.tokens - UnitTokenizer.FIRST  # padding (IGNORE_ID) goes negative
        dropped = {
            row: LABEL_MISMATCH
            for row, (frames, count) in enumerate(
                zip(frame_lens.tolist(), batch.token_lens.tolist(), strict=True)
            )
            if abs(frames - count) > 1
        }
        lengths = torch.minimum(frame_lens, batch.token_lens.to(frame_lens))
        rngs = [make_rng(batch.seed, batch.epoch, utt, "hubert-mask") for utt in batch.ids]
        frames = int(frame_lens.max())
        masked = span_mask(lengths.tolist(), self.config.mask_prob, self.config.mask_length, rngs)
        masked = F.pad(masked, (0, frames - masked.shape[1])).to(audio.device)
        hidden = self._backbone(audio, audio_lens, mask_time_indices=masked).last_hidden_state
        logits = self.logits(hidden)
        valid = torch.arange(frames, device=audio.device)[None] < lengths[:, None]
        if dropped and len(dropped) < len(batch.ids):
            valid[list(dropped)] = False
        targets = torch.full((len(batch.ids), frames), -1, dtype=torch.long, device=audio.device)
        width = min(frames, labels.shape[1])
        targets[:, :width] = labels[:, :width]
        total, parts = masked_prediction_losses(
            logits, targets, valid, masked, self.config.masked_weight, self.config.unmasked_weight
        )
        used = len(batch.ids) - len(dropped)
        metrics: dict[str, Metric | None] = {
            "loss": metric(total.detach(), used, UTTERANCES),
            **parts,
            "th_accuracy": parts["acc_m"],
        }
        return step_output(total, used, metrics, dropped)


def masked_prediction_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    masked: torch.Tensor,
    masked_weight: float,
    unmasked_weight: float,
) -> tuple[torch.Tensor, dict[str, Metric]]:
    """(B, T, K) logits, (B, T) cluster targets (negative: none), (B, T) bool valid and
    masked frames -> the loss summed over utterances (each the weighted mean over its
    masked and its unmasked frames), and loss_m, loss_u, acc_m, acc_u as frame sums."""
    valid = valid & (targets >= 0)
    cross_entropy = F.cross_entropy(
        logits.transpose(1, 2).float(), targets.clamp(min=0), reduction="none"
    )
    correct = (logits.argmax(-1) == targets) & valid
    parts: dict[str, Metric] = {}
    total = logits.new_zeros((), dtype=torch.float32)
    for name, where, weight in (
        ("m", valid & masked, masked_weight),
        ("u", valid & ~masked, unmasked_weight),
    ):
        count = where.sum(1)
        summed = (cross_entropy * where).sum(1)
        if weight > 0:
            total = total + weight * (summed / count.clamp(min=1)).sum()
        frames = count.sum()
        parts[f"loss_{name}"] = metric(summed.sum().detach(), frames, FRAMES)
        parts[f"acc_{name}"] = metric((correct & where).sum(), frames, FRAMES)
    return total, parts


def build_hubert(
    config: HubertModelConfig, vocab_size: int, cmvn: CmvnStats | None = None
) -> HubertPretrainModel:
    """The HuBERT model for a `units` tokenizer of `vocab_size` ids (K clusters + 3);
    `cmvn` is unused: the backbone normalises each utterance's waveform itself."""
    return HubertPretrainModel(config.hubert, vocab_size - UnitTokenizer.FIRST - 1)
