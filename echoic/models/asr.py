"""The ASR model family: frontend -> encoder -> any combination of CTC, attention and
transducer heads, under one metrics contract.

Dimensions flow from the producer: the encoder is built with the frontend's
`output_dim`, the heads with the encoder's, and the vocabulary size comes from the
tokenizer. A config states each of them nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from echoic.data.batch import Batch
from echoic.data.features import CmvnStats
from echoic.models.base import (
    EncoderModel,
    FrontendEncoderSection,
    build_frontend_encoder,
    step_output,
)
from echoic.models.contract import TOKENS, UTTERANCES, Metric, StepOutput, Unit
from echoic.models.encoders import Encoder
from echoic.models.heads import HeadOutput
from echoic.models.heads.attention import AttentionDecoderConfig, AttentionHead
from echoic.models.heads.ctc import CtcConfig, CtcHead
from echoic.models.heads.transducer import TransducerConfig, TransducerHead


@dataclass(frozen=True)
class AsrConfig(FrontendEncoderSection):
    """The ASR family's `model` section: any of the three heads (at least one)."""

    ctc: CtcConfig | None = None  # a section (even empty: `ctc: {}`) adds the head
    attention: AttentionDecoderConfig | None = None
    transducer: TransducerConfig | None = None

    def __post_init__(self) -> None:
        if self.ctc is None and self.attention is None and self.transducer is None:
            raise ValueError(
                "the model needs at least one head: ctc, attention, transducer, paraformer "
                "or hubert"
            )


class AsrModel(EncoderModel):
    """forward(batch) -> StepOutput with exactly `metric_units`' keys:

    loss         weighted sum of the present heads' losses, per utterance
    loss_ctc     CTC loss per utterance, None without a CTC head
    loss_att     attention-decoder loss per utterance (label-smoothed CE summed over
                 tokens), None without one
    loss_rnnt    transducer loss per utterance, None without one
    th_accuracy  token accuracy in [0, 1]: teacher-forced accuracy of the attention
                 decoder (next token given the true history, <eos> included) when there
                 is one; otherwise 1 - token error rate (clipped at 0 per utterance) of
                 greedy CTC output, or of greedy transducer output when there is no
                 CTC head either.
    """

    # Declared once for the family: every ASR model reports these, whatever its heads.
    metric_units: ClassVar[dict[str, Unit]] = {
        "loss": UTTERANCES,
        **CtcHead.metrics,
        **AttentionHead.metrics,
        **TransducerHead.metrics,
        "th_accuracy": TOKENS,
    }

    def __init__(
        self,
        frontend: nn.Module,
        encoder: Encoder,
        *,
        ctc: CtcHead | None = None,
        attention: AttentionHead | None = None,
        transducer: TransducerHead | None = None,
    ) -> None:
        super().__init__(frontend, encoder)
        if ctc is None and attention is None and transducer is None:
            raise ValueError("an AsrModel needs at least one head")
        self.ctc, self.attention, self.transducer = ctc, attention, transducer
        # A name, not a second reference: a module attribute would register the head twice.
        self._accuracy_head = next(
            n for n in ("attention", "ctc", "transducer") if getattr(self, n) is not None
        )

    @property
    def accuracy_head(self) -> nn.Module:
        """The head th_accuracy comes from: attention, else CTC, else transducer."""
        return getattr(self, self._accuracy_head)

    def token_indexed_parameters(self) -> list[str]:
        """State-dict keys whose first dimension is indexed by token id."""
        names = []
        for name in ("ctc", "attention", "transducer"):
            head = getattr(self, name)
            if head is not None:
                names += [f"{name}.{key}" for key in head.token_indexed()]
        return names

    # Decoding method -> the heads it needs, the default (most accurate) first.
    _METHOD_HEADS: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention_rescoring": ("ctc", "attention"),
        "rnnt_beam": ("transducer",),
        "ctc_prefix_beam": ("ctc",),
        "attention": ("attention",),
        "ctc_greedy": ("ctc",),
        "rnnt_greedy": ("transducer",),
    }

    def decode_methods(self) -> tuple[str, ...]:
        return tuple(
            method
            for method, heads in self._METHOD_HEADS.items()
            if all(getattr(self, head) is not None for head in heads)
        )

    @property
    def heads(self) -> list[nn.Module]:
        return [h for h in (self.ctc, self.attention, self.transducer) if h is not None]

    def forward(self, batch: Batch) -> StepOutput:
        if batch.tokens is None:
            raise ValueError("training an ASR model needs batches with tokens (a tokenizer)")
        inputs = self.usable_inputs(batch, self.ctc)
        tokens, token_lens, used = inputs.tokens, inputs.token_lens, inputs.used
        encoded, encoded_lens = self.encoder(inputs.feats, inputs.lengths)
        metrics: dict[str, Metric | None] = dict.fromkeys(self.metric_units)
        total = encoded.new_zeros((), dtype=torch.float32)
        accuracy = None
        for head in self.heads:
            out: HeadOutput = head(
                encoded, encoded_lens, tokens, token_lens, with_accuracy=head is self.accuracy_head
            )
            total = total + head.weight * out.loss
            metrics.update(out.metrics)
            accuracy = accuracy or out.accuracy
        metrics["loss"] = Metric(float(total.detach()), float(used), UTTERANCES)
        metrics["th_accuracy"] = accuracy
        return step_output(total, used, metrics, inputs.dropped)


def build_asr(config: AsrConfig, vocab_size: int, cmvn: CmvnStats | None = None) -> AsrModel:
    """The ASR family's model for `config` (see echoic.models.model.build_model)."""
    frontend, encoder = build_frontend_encoder(config.frontend, config.encoder, cmvn)
    dim = encoder.output_dim
    sos_eos = vocab_size - 1  # the tokenizer layout: <blank> 0, <unk> 1, ..., <sos/eos> last
    return AsrModel(
        frontend,
        encoder,
        ctc=CtcHead(dim, vocab_size, config.ctc) if config.ctc else None,
        attention=AttentionHead(dim, vocab_size, config.attention, sos_eos)
        if config.attention
        else None,
        transducer=TransducerHead(dim, vocab_size, config.transducer)
        if config.transducer
        else None,
    )
