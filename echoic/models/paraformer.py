"""The Paraformer family (arXiv 2206.08317): non-autoregressive ASR.

frontend -> encoder -> CIF predictor (one acoustic embedding per token, echoic.models.cif)
-> a decoder that predicts every token in one parallel pass, with cross-attention to
the encoder (echoic.models.heads.paraformer_decoder); an optional CTC head on the
encoder. Training is two-pass (glancing, echoic.models.glm): a first pass without
gradient over the acoustic embeddings, then a second over the same embeddings with
some replaced by the target tokens' own, as many as the first pass got wrong times
`glancing_ratio`, at positions drawn from (seed, epoch, utterance id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from echoic.data.batch import IGNORE_ID, Batch
from echoic.data.features import CmvnStats
from echoic.errors import EchoicError
from echoic.models.base import (
    EncoderModel,
    FrontendEncoderSection,
    build_frontend_encoder,
    step_output,
)
from echoic.models.bias import BiasConfig
from echoic.models.cif import (
    CifConfig,
    CifOutput,
    CifPredictor,
    Decoded,
    decoded_rows,
    quantity_loss,
)
from echoic.models.contract import TOKENS, UTTERANCES, Metric, StepOutput, Unit
from echoic.models.encoders import Encoder
from echoic.models.glm import glance, glancing_mask
from echoic.models.heads.ctc import CtcConfig, CtcHead
from echoic.models.heads.paraformer_decoder import ParaformerDecoder, ParaformerDecoderConfig


@dataclass(frozen=True)
class ParaformerConfig:
    cif: CifConfig = CifConfig()
    decoder: ParaformerDecoderConfig = ParaformerDecoderConfig()
    # Share of the first pass's wrong positions whose input becomes the target token's
    # embedding in the second pass; 0: one pass, no glancing.
    glancing_ratio: float = 0.75
    weight: float = 1.0  # of loss_att, the decoder's cross-entropy
    quantity_weight: float = 1.0  # of loss_pre, |predicted count - target count|
    label_smoothing: float = 0.1
    # Hotword modules (echoic.models.bias): a contextual or SeACo-Paraformer; null: none.
    bias: BiasConfig | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.glancing_ratio <= 1.0:
            raise ValueError("glancing_ratio must be in [0, 1]")
        if self.weight <= 0 or self.quantity_weight < 0:
            raise ValueError("weight must be positive and quantity_weight not negative")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")


@dataclass(frozen=True)
class ParaformerModelConfig(FrontendEncoderSection):
    """The Paraformer family's `model` section: selected by `paraformer:`, with at most
    a CTC head besides its own decoder."""

    ctc: CtcConfig | None = None
    paraformer: ParaformerConfig = ParaformerConfig()

    @property
    def uses_training_hotwords(self) -> bool:
        return self.paraformer.bias is not None

    def check_data(self, data) -> None:
        super().check_data(data)
        if self.paraformer.bias is not None and data.hotwords is None:
            raise ValueError(
                "model.paraformer.bias learns from training hotwords: set data.hotwords "
                "(e.g. data.hotwords: {rate: 0.5})"
            )


class ParaformerModel(EncoderModel):
    """forward(batch) -> StepOutput with exactly `metric_units`' keys:

    loss         weighted sum of the three losses below, per utterance
    loss_att     the decoder's label-smoothed cross-entropy summed over an utterance's
                 tokens (the second, glancing pass in training; the only pass in eval)
    loss_pre     the quantity loss: |sum of CIF weights - number of tokens| per utterance
    loss_ctc     CTC loss per utterance, None without a CTC head
    th_accuracy  token accuracy of one-pass decoding given the true token count: the
                 first pass in training (the second sees target tokens), the pass in eval
    """

    metric_units: ClassVar[dict[str, Unit]] = {
        "loss": UTTERANCES,
        "loss_att": UTTERANCES,
        "loss_pre": UTTERANCES,
        **CtcHead.metrics,
        "th_accuracy": TOKENS,
    }

    def __init__(
        self,
        frontend,
        encoder: Encoder,
        predictor: CifPredictor,
        decoder: ParaformerDecoder,
        config: ParaformerConfig,
        ctc: CtcHead | None = None,
    ) -> None:
        super().__init__(frontend, encoder)
        self.predictor = predictor
        self.decoder = decoder
        self.ctc = ctc
        self.config = config

    def token_indexed_parameters(self) -> list[str]:
        names = [f"decoder.{key}" for key in self.decoder.token_indexed()]
        if self.ctc is not None:
            names += [f"ctc.{key}" for key in self.ctc.token_indexed()]
        return names

    def forward(self, batch: Batch) -> StepOutput:
        if batch.tokens is None:
            raise ValueError("training a Paraformer needs batches with tokens (a tokenizer)")
        inputs = self.usable_inputs(batch, self.ctc)
        tokens, token_lens, used = inputs.tokens, inputs.token_lens, inputs.used
        encoded, encoded_lens = self.encoder(inputs.feats, inputs.lengths)
        cif = self.predictor(encoded, encoded_lens, token_lens)
        width = tokens.shape[1]
        acoustic = cif.embeddings[:, :width]
        loss_pre = quantity_loss(cif.predicted, token_lens)
        bias = self.decoder_bias(_batch_hotwords(batch), len(token_lens))

        first = None
        decoder_input = acoustic
        if self.training and self.config.glancing_ratio > 0:
            with torch.no_grad():
                first = self.decoder(acoustic, token_lens, encoded, encoded_lens, bias=bias)
            mask = glancing_mask(
                first.argmax(-1),
                tokens,
                token_lens,
                inputs.ids,
                ratio=self.config.glancing_ratio,
                seed=batch.seed,
                epoch=batch.epoch,
            )
            decoder_input = glance(acoustic, self.decoder.embed_tokens(tokens), mask)
        logits = self.decoder(decoder_input, token_lens, encoded, encoded_lens, bias=bias)
        loss_att = F.cross_entropy(
            logits.float().transpose(1, 2),
            tokens,
            ignore_index=IGNORE_ID,
            label_smoothing=self.config.label_smoothing,
            reduction="sum",
        )
        one_pass = logits if first is None else first
        valid = tokens != IGNORE_ID
        correct = ((one_pass.argmax(-1) == tokens) & valid).sum()

        utterances = float(used)
        total = self.config.weight * loss_att + self.config.quantity_weight * loss_pre
        metrics: dict[str, Metric | None] = dict.fromkeys(self.metric_units)
        metrics["loss_att"] = Metric(float(loss_att.detach()), utterances, UTTERANCES)
        metrics["loss_pre"] = Metric(float(loss_pre.detach()), utterances, UTTERANCES)
        if self.ctc is not None:
            out = self.ctc(encoded, encoded_lens, tokens, token_lens)
            total = total + self.ctc.weight * out.loss
            metrics.update(out.metrics)
        total = total + self.bias_loss(batch, inputs, acoustic, encoded, encoded_lens, metrics)
        metrics["th_accuracy"] = Metric(float(correct), float(valid.sum()), TOKENS)
        metrics["loss"] = Metric(float(total.detach()), utterances, UTTERANCES)
        return step_output(total, used, metrics, inputs.dropped)

    # -- what a contextual family changes (echoic.models.bias) --------------------------

    def decoder_bias(
        self, hotwords: tuple[torch.Tensor, torch.Tensor] | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The hotword memory the decoder attends to; None: a plain Paraformer."""
        return None

    def bias_loss(self, batch, inputs, acoustic, encoded, encoded_lens, metrics) -> torch.Tensor:
        """A loss of the hotword modules, its metric put in `metrics`; 0 for none."""
        return acoustic.new_zeros(())

    def position_log_probs(
        self,
        states: torch.Tensor,
        cif: CifOutput,
        encoded: torch.Tensor,
        lengths: torch.Tensor,
        hotwords: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Log-probabilities (B, N, V) per position from the decoder's states."""
        return self.decoder.out(states).float().log_softmax(-1)

    def decode_methods(self) -> tuple[str, ...]:
        """The one pass first; the CTC searches where there is a CTC head."""
        return ("paraformer", "ctc_prefix_beam", "ctc_greedy") if self.ctc else ("paraformer",)

    export_outputs: ClassVar[dict[str, str]] = {
        "tokens": "(B, N) int64 best token per position, N = encoder frames (+ 1 with a CIF tail)",
        "scores": "(B, N) float32 its log-probability",
        "counts": "(B,) int64 tokens fired: positions from counts on are padding",
        "positions": "(B, N) int64 encoder frame each token fired at, -1 beyond counts",
        "out_lens": "(B,) int64 encoder frames per utterance",
    }

    def export_path(self) -> nn.Module:
        return ParaformerPath(self)

    @torch.no_grad()
    def one_pass(
        self,
        encoded: torch.Tensor,
        lengths: torch.Tensor,
        *,
        fixed_width: bool = False,
        hotwords: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """CIF (with its tail) fires the embeddings, the decoder predicts every position
        at once, the best token per position wins -> tokens (B, N), their
        log-probabilities (B, N), counts (B,), firing frames (B, N). N is the longest
        count, or with `fixed_width` the frame count + 1 (export: no shape depends on
        the data; the extra positions are masked out of self-attention, so the
        positions within each count are the same). `hotwords`: a contextual model's
        list, (K, L) token ids padded with -1 and (K,) lengths; None: no list."""
        cif = self.predictor(encoded, lengths, fixed_width=fixed_width)
        bias = self.decoder_bias(hotwords, encoded.shape[0])
        states = self.decoder.states(cif.embeddings, cif.counts, encoded, lengths, bias=bias)
        best = self.position_log_probs(states, cif, encoded, lengths, hotwords).max(-1)
        return best.indices, best.values, cif.counts, cif.positions

    def parallel_decode(
        self,
        encoded: torch.Tensor,
        lengths: torch.Tensor,
        hotwords: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> list[Decoded]:
        """One pass over the batch; times come from the CIF firing frames."""
        return decoded_rows(
            *self.one_pass(encoded, lengths, hotwords=hotwords),
            lengths,
            self.encoder.frame_shift,
        )


class ParaformerPath(nn.Module):
    """Frontend normalisation -> encoder -> the one pass at a fixed width, tensors in
    and out: what `echoic export` traces for a Paraformer (`export_outputs`)."""

    def __init__(self, model: ParaformerModel) -> None:
        super().__init__()
        if model.predictor.max_tokens_per_frame > 1.0:
            raise EchoicError(
                "export needs CIF weights of at most one token per frame "
                "(smooth_factor - noise_threshold and tail_threshold <= threshold)"
            )
        self.model = model

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats, lens = self.model.frontend.export_features(feats, feat_lens)
        encoded, lens = self.model.encoder(feats, lens, static=True)
        return (*self.model.one_pass(encoded, lens, fixed_width=True), lens)


def _batch_hotwords(batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
    if batch.hotwords is None:
        return None
    return batch.hotwords, batch.hotword_lens


def build_paraformer(
    config: ParaformerModelConfig, vocab_size: int, cmvn: CmvnStats | None = None
) -> ParaformerModel:
    """The Paraformer family's model for `config` (see echoic.models.model.build_model);
    with a `bias` section, echoic.models.contextual builds it on the same parts."""
    return ParaformerModel(*paraformer_parts(config, vocab_size, cmvn))


def paraformer_parts(
    config: ParaformerModelConfig,
    vocab_size: int,
    cmvn: CmvnStats | None,
    *,
    contextual: bool = False,
) -> tuple:
    """(frontend, encoder, predictor, decoder, config, ctc) in ParaformerModel's order;
    `contextual`: a decoder that attends to hotwords."""
    frontend, encoder = build_frontend_encoder(config.frontend, config.encoder, cmvn)
    dim = encoder.output_dim
    paraformer = config.paraformer
    return (
        frontend,
        encoder,
        CifPredictor(dim, paraformer.cif),
        ParaformerDecoder(dim, vocab_size, paraformer.decoder, contextual=contextual),
        paraformer,
        CtcHead(dim, vocab_size, config.ctc) if config.ctc else None,
    )
