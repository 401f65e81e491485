"""Hotword modules for contextual Paraformers: what the model is told to listen for.

`BiasEncoder` turns a hotword list into one embedding per hotword (token embedding, an
LSTM over the hotword's tokens, its last state) plus a learned "no bias" entry first,
so attention always has somewhere to go when nothing listed is spoken.

Two ways to use them (`BiasConfig.kind`):

- contextual (CLAS style): the Paraformer decoder attends to the hotword embeddings
  after its layers (echoic.models.heads.paraformer_decoder), and its own posterior
  learns to favour what is listed.
- seaco (SeACo-Paraformer, arXiv 2308.03266): the ASR decoder is left as it is. A
  separate `seaco_decoder` reads the ASR decoder's states and the acoustic embeddings,
  attends to the hotword embeddings, and `hotword_output_layer` gives a second
  posterior over the vocabulary in which id 0 (NO_BIAS) means "no hotword here". At
  inference the two posteriors are merged where the hotword posterior's best is not
  NO_BIAS, after the attention-score filter has dropped the hotwords the seaco
  decoder's attention never picked (`filter_hotwords`), so a long list of mostly
  absent hotwords cannot pull unrelated positions.

Shapes: B batch, N token positions, K hotwords (K + 1 entries with no-bias), L
hotword tokens, D width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from echoic.data.hotwords import NO_BIAS
from echoic.models.heads.attention import AttentionDecoderConfig, DecoderLayer
from echoic.models.layers import lengths_to_mask


@dataclass(frozen=True)
class BiasConfig:
    kind: Literal["seaco", "contextual"] = "seaco"
    # seaco_decoder layers (seaco only)
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 384
    dropout: float = 0.0
    weight: float = 1.0  # of loss_seaco
    # Inference (seaco): share of the hotword posterior where it names a token.
    merge_weight: float = 0.5
    # Attention-score filter (seaco): a hotword is kept for an utterance when the seaco
    # decoder's last cross-attention gives it at least this weight at some position
    # (heads averaged), and among the `max_kept` best; the others are masked out.
    filter_threshold: float = 0.2
    max_kept: int = 10

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError("bias num_layers must be >= 1")
        if not 0.0 <= self.merge_weight <= 1.0:
            raise ValueError("bias merge_weight must be in [0, 1]")
        if not 0.0 <= self.filter_threshold <= 1.0 or self.max_kept < 1:
            raise ValueError("bias filter_threshold must be in [0, 1] and max_kept >= 1")
        if self.weight < 0:
            raise ValueError("bias weight must not be negative")
        if self.kind == "contextual":
            seaco_only = [
                name
                for name in ("num_layers", "num_heads", "ffn_dim", "dropout", "weight",
                             "merge_weight", "filter_threshold", "max_kept")
                if getattr(self, name) != getattr(BiasConfig, name)
            ]  # fmt: skip
            if seaco_only:
                raise ValueError(
                    f"{', '.join(seaco_only)} set the seaco decoder; kind contextual has none "
                    "(its attention to hotwords uses the decoder's heads)"
                )


class BiasEncoder(nn.Module):
    """hotwords (K, L) token ids padded with -1, lengths (K,) -> (K + 1, D): the
    no-bias entry first, then each hotword's LSTM state after its last token."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.no_bias = nn.Parameter(torch.randn(dim) * 0.02)

    def token_indexed(self) -> list[str]:
        return ["embed.weight"]

    def forward(self, hotwords: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if not hotwords.shape[0]:
            # No hotwords (a batch where no utterance gave one): the embedding and LSTM
            # still run, on one token, and add exactly 0, so every parameter gets a
            # gradient as distributed training needs.
            unused, _ = self.lstm(self.embed(hotwords.new_zeros(1, 1)))
            return self.no_bias[None] + 0.0 * unused.sum()
        # The LSTM runs left to right, so padding after a hotword cannot reach the
        # state read at its last token.
        states, _ = self.lstm(self.embed(hotwords.clamp(min=0)))
        rows = torch.arange(hotwords.shape[0], device=hotwords.device)
        return torch.cat([self.no_bias[None], states[rows, lengths.clamp(min=1) - 1]])


def expand_hotwords(
    embeddings: torch.Tensor, batch: int, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K + 1, D) shared by the batch -> memory (B, K + 1, D) and its attention mask
    (B, 1, 1, K + 1); `keep` (B, K + 1) masks entries out per utterance (no-bias is
    always kept)."""
    memory = embeddings[None].expand(batch, -1, -1)
    if keep is None:
        keep = torch.ones(batch, embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
    keep = keep.clone()
    keep[:, 0] = True
    return memory, keep[:, None, None, :]


class SeacoDecoder(nn.Module):
    """ASR decoder states and acoustic embeddings (B, N, D) each, their counts (B,),
    hotword memory (B, K + 1, D) and mask -> states (B, N, D) for the hotword output
    layer; with `scores=True` also the last layer's cross-attention weights over the
    hotwords (B, N, K + 1), heads averaged."""

    def __init__(self, dim: int, config: BiasConfig) -> None:
        super().__init__()
        layer_config = AttentionDecoderConfig(
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            ffn_dim=config.ffn_dim,
            dropout=config.dropout,
        )
        self.input = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(
            DecoderLayer(dim, layer_config) for _ in range(config.num_layers)
        )
        self.final_norm = nn.LayerNorm(dim)

    def forward(
        self,
        states: torch.Tensor,
        acoustic: torch.Tensor,
        lengths: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        *,
        scores: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        positions = states.shape[1]
        keys = lengths_to_mask(lengths, positions) | (lengths == 0)[:, None]
        self_mask = keys[:, None, None, :]
        x = self.input(torch.cat([states, acoustic.to(states.dtype)], dim=-1))
        weights = None
        for index, layer in enumerate(self.layers):
            if scores and index == len(self.layers) - 1:
                weights = cross_attention_weights(layer, x, self_mask, memory, memory_mask)
            x = layer(x, self_mask, memory, memory_mask)
        return self.final_norm(x), weights


def cross_attention_weights(
    layer: DecoderLayer,
    x: torch.Tensor,
    self_mask: torch.Tensor,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
) -> torch.Tensor:
    """The weights `layer`'s cross-attention gives each memory entry (B, N, K + 1),
    averaged over heads: the layer's own steps up to its cross-attention, in eval mode
    (no dropout), with the softmax the fused attention keeps to itself."""
    y = layer.self_norm(x)
    x = x + layer.self_attn(y, y, y, mask=self_mask)
    attention = layer.cross_attn
    query = attention._heads(attention.query(layer.cross_norm(x)))
    key = attention._heads(attention.key(memory))
    logits = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(attention.head_dim)
    logits = logits.masked_fill(~memory_mask, float("-inf"))
    return logits.float().softmax(-1).mean(dim=1)


def filter_hotwords(
    weights: torch.Tensor, lengths: torch.Tensor, threshold: float, max_kept: int
) -> torch.Tensor:
    """Cross-attention weights (B, N, K + 1) and counts (B,) -> keep (B, K + 1): per
    utterance, the hotwords whose largest weight over its positions reaches
    `threshold`, at most the `max_kept` largest of those; no-bias always."""
    valid = lengths_to_mask(lengths, weights.shape[1])[..., None]
    peak = weights.masked_fill(~valid, 0.0).amax(dim=1)  # (B, K + 1)
    keep = peak >= threshold
    hotwords = peak.shape[1] - 1
    if hotwords > max_kept:
        top = peak[:, 1:].topk(max_kept, dim=1).indices + 1
        best = torch.zeros_like(keep)
        best.scatter_(1, top, True)
        keep &= best
    keep[:, 0] = True
    return keep


def merge_posteriors(
    asr_logits: torch.Tensor, bias_logits: torch.Tensor, merge_weight: float
) -> torch.Tensor:
    """(B, N, V) logits of the ASR decoder and the hotword output layer -> merged
    log-probabilities: the ASR posterior where the hotword posterior's best is NO_BIAS,
    elsewhere (1 - w) * ASR + w * hotword posterior (its NO_BIAS mass left out)."""
    asr = asr_logits.float().softmax(-1)
    bias = bias_logits.float().softmax(-1)
    named = bias.argmax(-1) != NO_BIAS
    bias = bias.clone()
    bias[..., NO_BIAS] = 0.0
    bias = bias / bias.sum(-1, keepdim=True).clamp(min=torch.finfo(bias.dtype).tiny)
    merged = torch.where(named[..., None], (1 - merge_weight) * asr + merge_weight * bias, asr)
    return merged.clamp(min=torch.finfo(merged.dtype).tiny).log()
