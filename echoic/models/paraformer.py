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
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from echoic.data.dataset import IGNORE_ID, Batch
from echoic.data.features import CmvnStats
from echoic.models.base import EncoderModel, build_frontend_encoder, step_output
from echoic.models.cif import CifConfig, CifPredictor, quantity_loss, token_times
from echoic.models.contract import TOKENS, UTTERANCES, Metric, StepOutput, Unit
from echoic.models.encoders import Encoder
from echoic.models.glm import glance, glancing_mask
from echoic.models.heads.ctc import CtcHead
from echoic.models.heads.paraformer_decoder import ParaformerDecoder, ParaformerDecoderConfig

if TYPE_CHECKING:
    from echoic.models.model import ModelConfig


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

    def __post_init__(self) -> None:
        if not 0.0 <= self.glancing_ratio <= 1.0:
            raise ValueError("glancing_ratio must be in [0, 1]")
        if self.weight <= 0 or self.quantity_weight < 0:
            raise ValueError("weight must be positive and quantity_weight not negative")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")


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

        first = None
        decoder_input = acoustic
        if self.training and self.config.glancing_ratio > 0:
            with torch.no_grad():
                first = self.decoder(acoustic, token_lens, encoded, encoded_lens)
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
        logits = self.decoder(decoder_input, token_lens, encoded, encoded_lens)
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
        metrics["th_accuracy"] = Metric(float(correct), float(valid.sum()), TOKENS)
        metrics["loss"] = Metric(float(total.detach()), utterances, UTTERANCES)
        return step_output(total, used, metrics, inputs.dropped)

    @torch.no_grad()
    def parallel_decode(self, encoded: torch.Tensor, lengths: torch.Tensor) -> list[Decoded]:
        """One pass: CIF (with its tail) fires the embeddings, the decoder predicts every
        position at once, the best token per position wins. Times come from the CIF
        firing frames."""
        cif = self.predictor(encoded, lengths)
        logits = self.decoder(cif.embeddings, cif.counts, encoded, lengths)
        best = logits.float().log_softmax(-1).max(-1)
        results = []
        shift = self.encoder.frame_shift
        for row, count in enumerate(cif.counts.tolist()):
            duration = float(lengths[row]) * shift
            results.append(
                Decoded(
                    tuple(best.indices[row, :count].tolist()),
                    float(best.values[row, :count].sum()),
                    tuple(token_times(cif.positions[row, :count].tolist(), shift, duration)),
                )
            )
        return results


@dataclass(frozen=True)
class Decoded:
    """One utterance's one-pass result."""

    tokens: tuple[int, ...]
    score: float  # sum of the chosen tokens' log-probabilities
    times: tuple[tuple[float, float], ...]  # (start, end) seconds per token


def build_paraformer(
    config: ModelConfig, vocab_size: int, cmvn: CmvnStats | None = None
) -> ParaformerModel:
    """The Paraformer family's model for `config` (see echoic.models.model.build_model)."""
    frontend, encoder = build_frontend_encoder(config.frontend, config.encoder, cmvn)
    dim = encoder.output_dim
    paraformer = config.paraformer
    return ParaformerModel(
        frontend,
        encoder,
        CifPredictor(dim, paraformer.cif),
        ParaformerDecoder(dim, vocab_size, paraformer.decoder),
        paraformer,
        ctc=CtcHead(dim, vocab_size, config.ctc) if config.ctc else None,
    )
