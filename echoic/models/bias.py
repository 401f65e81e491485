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

Shapes: B batch, N token positions, K hotwords (K + 1 with no-bias), E memory entries
(K + 1, or 1 + K * L with `memory: tokens`), L hotword tokens, D width, V vocabulary.
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
    # What the attention to hotwords reads: "last" one entry per hotword (the bias
    # encoder's state after its last token, as CLAS and SeACo do), or "tokens" one
    # entry per hotword token (the state after each token), so a position can attend to
    # the very token it should spell; the filter and the metrics then sum a hotword's
    # entries.
    memory: Literal["last", "tokens"] = "last"
    # The hotword posterior (seaco): False, `hotword_output_layer` is a linear layer over
    # the vocabulary, as in the paper; True (needs memory: tokens), it is a pointer: an
    # attention from each position over the memory entries, whose weights go to the
    # tokens the entries spell (the no-bias entry's to NO_BIAS), so the posterior can
    # only name a listed hotword's tokens and needs no vocabulary-sized layer.
    copy: bool = False

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError("bias num_layers must be >= 1")
        if not 0.0 <= self.merge_weight <= 1.0:
            raise ValueError("bias merge_weight must be in [0, 1]")
        if not 0.0 <= self.filter_threshold <= 1.0 or self.max_kept < 1:
            raise ValueError("bias filter_threshold must be in [0, 1] and max_kept >= 1")
        if self.weight < 0:
            raise ValueError("bias weight must not be negative")
        if self.copy and self.memory != "tokens":
            raise ValueError("bias copy needs memory: tokens (an entry per hotword token)")
        if self.kind == "contextual":
            seaco_only = [
                name
                for name in ("num_layers", "num_heads", "ffn_dim", "dropout", "weight",
                             "merge_weight", "filter_threshold", "max_kept", "copy")
                if getattr(self, name) != getattr(BiasConfig, name)
            ]  # fmt: skip
            if seaco_only:
                raise ValueError(
                    f"{', '.join(seaco_only)} set the seaco decoder; kind contextual has none "
                    "(its attention to hotwords uses the decoder's heads)"
                )


@dataclass
class HotwordMemory:
    """What attention to the hotwords reads, shared by a batch: E entries, the no-bias
    entry first. `owner` says whose entry each is (0 no-bias, k the k-th hotword), so
    per-hotword scores and masks map onto entries; `valid` is False on padding."""

    entries: torch.Tensor  # (E, D)
    owner: torch.Tensor  # (E,) int64 in [0, K]
    valid: torch.Tensor  # (E,) bool
    num_hotwords: int  # K
    # (E,) int64: the token an entry spells (NO_BIAS for no-bias, padding and a
    # whole-hotword entry), what a copy posterior names
    tokens: torch.Tensor

    def per_hotword(self, weights: torch.Tensor) -> torch.Tensor:
        """Attention weights over entries (..., E) -> summed per hotword (..., K + 1)."""
        out = weights.new_zeros(*weights.shape[:-1], self.num_hotwords + 1)
        return out.index_add_(-1, self.owner, weights)


class BiasEncoder(nn.Module):
    """hotwords (K, L) token ids padded with -1, lengths (K,) -> HotwordMemory: the
    no-bias entry, then per hotword its LSTM state after its last token (`per_token`
    False) or after each of its tokens (True)."""

    def __init__(self, vocab_size: int, dim: int, per_token: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.no_bias = nn.Parameter(torch.randn(dim) * 0.02)
        self.per_token = per_token

    def token_indexed(self) -> list[str]:
        return ["embed.weight"]

    def forward(self, hotwords: torch.Tensor, lengths: torch.Tensor) -> HotwordMemory:
        device = hotwords.device
        first = torch.zeros(1, dtype=torch.long, device=device)
        if not hotwords.shape[0]:
            # No hotwords (a batch where no utterance gave one): the embedding and LSTM
            # still run, on one token, and add exactly 0, so every parameter gets a
            # gradient as distributed training needs.
            unused, _ = self.lstm(self.embed(hotwords.new_zeros(1, 1)))
            entries = self.no_bias[None] + 0.0 * unused.sum()
            return HotwordMemory(entries, first, first == 0, 0, first)
        # The LSTM runs left to right, so padding after a hotword cannot reach the
        # states read at its tokens.
        states, _ = self.lstm(self.embed(hotwords.clamp(min=0)))
        count, width = hotwords.shape
        if self.per_token:
            owner = torch.arange(1, count + 1, device=device).repeat_interleave(width)
            valid = (torch.arange(width, device=device)[None] < lengths[:, None]).flatten()
            entries = torch.cat([self.no_bias[None], states.flatten(0, 1)])
            spelled = hotwords.clamp(min=NO_BIAS).flatten()
            return HotwordMemory(
                entries,
                torch.cat([first, owner]),
                torch.cat([first == 0, valid]),
                count,
                torch.cat([first, spelled]),
            )
        rows = torch.arange(count, device=device)
        entries = torch.cat([self.no_bias[None], states[rows, lengths.clamp(min=1) - 1]])
        owner = torch.arange(count + 1, device=device)
        valid = torch.ones_like(owner, dtype=torch.bool)
        return HotwordMemory(entries, owner, valid, count, torch.zeros_like(owner))


def expand_hotwords(
    memory: HotwordMemory, batch: int, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's shared memory -> entries (B, E, D) and their attention mask
    (B, 1, 1, E); `keep` (B, K + 1) masks hotwords out per utterance (no-bias is
    always kept)."""
    entries = memory.entries[None].expand(batch, -1, -1)
    mask = memory.valid[None].expand(batch, -1)
    if keep is not None:
        keep = keep.clone()
        keep[:, 0] = True
        mask = mask & keep[:, memory.owner]
    return entries, mask[:, None, None, :]


class SeacoDecoder(nn.Module):
    """ASR decoder states and acoustic embeddings (B, N, D) each, their counts (B,),
    hotword memory entries (B, E, D) and mask -> states (B, N, D) for the hotword
    output layer; with `scores=True` also the last layer's cross-attention weights over
    the entries (B, N, E), heads averaged."""

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


class CopyOutput(nn.Module):
    """The pointer hotword posterior (`copy: true`): seaco decoder states (B, N, D),
    memory entries (B, E, D), their mask (B, 1, 1, E) and tokens (E,) -> log-posterior
    over the vocabulary (B, N, V) and the pointer's weights over the entries
    (B, N, E). A token's probability is the weight of the entries that spell it."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.vocab_size = vocab_size

    def forward(
        self,
        states: torch.Tensor,
        entries: torch.Tensor,
        mask: torch.Tensor,
        tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.matmul(self.query(states), self.key(entries).transpose(1, 2))
        logits = logits.float() / math.sqrt(states.shape[-1])
        weights = logits.masked_fill(~mask[:, 0], float("-inf")).softmax(-1)
        index = tokens[None, None].expand(*weights.shape)
        posterior = weights.new_zeros(*weights.shape[:2], self.vocab_size)
        posterior = posterior.scatter_add(-1, index, weights)
        return posterior.clamp(min=torch.finfo(posterior.dtype).tiny).log(), weights


def cross_attention_weights(
    layer: DecoderLayer,
    x: torch.Tensor,
    self_mask: torch.Tensor,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
) -> torch.Tensor:
    """The weights `layer`'s cross-attention gives each memory entry (B, N, E),
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
    """Cross-attention weights per hotword (B, N, K + 1) and counts (B,) -> keep
    (B, K + 1): per
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
    """(B, N, V) logits (or log-probabilities) of the ASR decoder and the hotword
    posterior -> merged
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
