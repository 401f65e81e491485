"""Contextual Paraformer and SeACo-Paraformer: the Paraformer family with hotwords.

Both add a `bias_encoder` (echoic.models.bias) that embeds the hotword list; a batch's
list comes from the data path (data.hotwords, echoic.data.hotwords), a decode's from
the hotword file. Module names are what a `freeze:` list or a stage names:
`bias_encoder` (its `embed` is the hotword embedding), and for SeACo `seaco_decoder`
and `hotword_output_layer`; the contextual model's attention to hotwords is
`decoder.bias_norm` and `decoder.bias_attn`.

SeACo's bias loss reaches the ASR decoder and encoder too (the seaco decoder reads
their states, not detached, as in joint training): a stage that freezes the hotword
modules still lets `loss_seaco` move the ASR part. Freezing is per module, not per
loss.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from echoic.data.batch import IGNORE_ID, Batch
from echoic.data.features import CmvnStats
from echoic.models.base import UsableInputs
from echoic.models.bias import (
    BiasEncoder,
    CopyOutput,
    HotwordMemory,
    SeacoDecoder,
    expand_hotwords,
    filter_hotwords,
    merge_posteriors,
)
from echoic.models.cif import CifOutput
from echoic.models.contract import UTTERANCES, Metric, Unit
from echoic.models.paraformer import (
    ParaformerModel,
    ParaformerModelConfig,
    build_paraformer,
    paraformer_parts,
)

Hotwords = tuple[torch.Tensor, torch.Tensor]  # (K, L) token ids padded with -1, (K,) lengths


class BiasedParaformer(ParaformerModel):
    """What both contextual models share: the bias encoder and the hotword memory."""

    def __init__(self, *parts, vocab_size: int) -> None:
        super().__init__(*parts)
        per_token = self.config.bias.memory == "tokens"
        self.bias_encoder = BiasEncoder(vocab_size, self.encoder.output_dim, per_token)

    def token_indexed_parameters(self) -> list[str]:
        own = [f"bias_encoder.{key}" for key in self.bias_encoder.token_indexed()]
        return super().token_indexed_parameters() + own

    def hotword_memory(self, hotwords: Hotwords | None) -> HotwordMemory:
        """The list's memory entries; no list is the no-bias entry alone."""
        if hotwords is None:
            device = self.bias_encoder.no_bias.device
            hotwords = (
                torch.zeros(0, 1, dtype=torch.long, device=device),
                torch.zeros(0, dtype=torch.long, device=device),
            )
        return self.bias_encoder(*hotwords)


class ContextualParaformer(BiasedParaformer):
    """CLAS style: the decoder attends to the hotword embeddings after its layers; its
    own cross-entropy teaches it to use them. Same metrics as a plain Paraformer."""

    def decoder_bias(self, hotwords: Hotwords | None, batch: int):
        return expand_hotwords(self.hotword_memory(hotwords), batch)


class SeacoParaformer(BiasedParaformer):
    """SeACo: the ASR decoder is a plain Paraformer's; `seaco_decoder` and
    `hotword_output_layer` learn, with `loss_seaco`, where a listed hotword is spoken
    and which of its tokens; their posterior is merged with the ASR posterior at
    inference.

    loss_seaco  cross-entropy of the hotword posterior per utterance, summed over its
                tokens: the token inside the utterance's own training hotword, NO_BIAS
                everywhere else
    """

    metric_units: ClassVar[dict[str, Unit]] = {
        **ParaformerModel.metric_units,
        "loss_seaco": UTTERANCES,
    }

    def __init__(self, *parts, vocab_size: int) -> None:
        super().__init__(*parts, vocab_size=vocab_size)
        bias = self.config.bias
        dim = self.encoder.output_dim
        self.seaco_decoder = SeacoDecoder(dim, bias)
        self.hotword_output_layer: nn.Module = (
            CopyOutput(dim, vocab_size) if bias.copy else nn.Linear(dim, vocab_size)
        )

    def token_indexed_parameters(self) -> list[str]:
        own = (
            []
            if self.config.bias.copy
            else ["hotword_output_layer.weight", "hotword_output_layer.bias"]
        )
        return super().token_indexed_parameters() + own

    def hotword_posterior(
        self, out: torch.Tensor, memory: HotwordMemory, entries: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The seaco decoder's states -> hotword logits or log-posterior (B, N, V), and
        a copy posterior's pointer weights over the entries (None for the linear one)."""
        if self.config.bias.copy:
            return self.hotword_output_layer(out, entries, mask, memory.tokens)
        return self.hotword_output_layer(out), None

    def bias_loss(
        self,
        batch: Batch,
        inputs: UsableInputs,
        acoustic: torch.Tensor,
        encoded: torch.Tensor,
        encoded_lens: torch.Tensor,
        metrics: dict,
    ) -> torch.Tensor:
        if batch.bias_targets is None:
            raise ValueError(
                "a SeACo-Paraformer trains on batches with hotwords: set data.hotwords"
            )
        token_lens = inputs.token_lens
        # The ASR decoder's states on the acoustic embeddings alone (no glancing): what
        # the seaco decoder reads at inference.
        states = self.decoder.states(acoustic, token_lens, encoded, encoded_lens)
        memory = self.hotword_memory((batch.hotwords, batch.hotword_lens))
        entries, mask = expand_hotwords(memory, len(token_lens))
        out, _ = self.seaco_decoder(states, acoustic, token_lens, entries, mask)
        logits, _ = self.hotword_posterior(out, memory, entries, mask)
        targets = batch.bias_targets
        if inputs.dropped and inputs.used:
            keep = [row for row in range(batch.size) if row not in inputs.dropped]
            targets = targets[keep]
        targets = targets[:, : logits.shape[1]]
        loss = F.cross_entropy(
            logits.float().transpose(1, 2), targets, ignore_index=IGNORE_ID, reduction="sum"
        )
        metrics["loss_seaco"] = Metric(float(loss.detach()), float(inputs.used), UTTERANCES)
        return self.config.bias.weight * loss

    def position_log_probs(
        self,
        states: torch.Tensor,
        cif: CifOutput,
        encoded: torch.Tensor,
        lengths: torch.Tensor,
        hotwords: Hotwords | None,
    ) -> torch.Tensor:
        asr_logits = self.decoder.out(states)
        if hotwords is None or hotwords[0].shape[0] == 0:
            return asr_logits.float().log_softmax(-1)  # no list: plain decoding
        bias = self.config.bias
        memory = self.hotword_memory(hotwords)
        entries, mask = expand_hotwords(memory, states.shape[0])
        acoustic = cif.embeddings
        out, weights = self.seaco_decoder(states, acoustic, cif.counts, entries, mask, scores=True)
        if bias.copy:  # the pointer's weights say which hotwords it names
            _, weights = self.hotword_posterior(out, memory, entries, mask)
        keep = filter_hotwords(
            memory.per_hotword(weights), cif.counts, bias.filter_threshold, bias.max_kept
        )
        entries, mask = expand_hotwords(memory, states.shape[0], keep)
        out, _ = self.seaco_decoder(states, acoustic, cif.counts, entries, mask)
        logits, _ = self.hotword_posterior(out, memory, entries, mask)
        merged = merge_posteriors(asr_logits, logits, bias.merge_weight)
        # An utterance whose every hotword was filtered out decodes as without a list.
        plain = asr_logits.float().log_softmax(-1)
        listed = keep[:, 1:].any(dim=1)[:, None, None]
        return torch.where(listed, merged, plain)


def build_contextual_paraformer(
    config: ParaformerModelConfig, vocab_size: int, cmvn: CmvnStats | None = None
) -> BiasedParaformer:
    """A Paraformer with hotword modules, as `config.paraformer.bias.kind` names."""
    kind = config.paraformer.bias.kind
    parts = paraformer_parts(config, vocab_size, cmvn, contextual=kind == "contextual")
    model_class = ContextualParaformer if kind == "contextual" else SeacoParaformer
    return model_class(*parts, vocab_size=vocab_size)


def build_paraformer_family(
    config: ParaformerModelConfig, vocab_size: int, cmvn: CmvnStats | None = None
) -> ParaformerModel:
    """The Paraformer family's builder: with `paraformer.bias`, a contextual or SeACo
    Paraformer; without, a plain one."""
    if config.paraformer.bias is not None:
        return build_contextual_paraformer(config, vocab_size, cmvn)
    return build_paraformer(config, vocab_size, cmvn)
