"""Attention decoder head: a Transformer decoder trained with teacher forcing and label
smoothing, optionally with a second, right-to-left decoder for bidirectional rescoring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from echoic.data.batch import IGNORE_ID
from echoic.models.contract import TOKENS, UTTERANCES, Metric, Unit, metric
from echoic.models.heads import HeadOutput
from echoic.models.layers import (
    Dropout,
    FeedForward,
    MultiHeadAttention,
    lengths_to_mask,
    sinusoids,
)


@dataclass(frozen=True)
class AttentionDecoderConfig:
    weight: float = 0.7  # share of the total loss
    num_layers: int = 6
    num_heads: int = 4
    ffn_dim: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0
    label_smoothing: float = 0.1
    right_to_left_layers: int = 0  # > 0 adds a right-to-left decoder of this depth
    right_to_left_weight: float = 0.3  # its share of the attention loss

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        if not 0.0 <= self.right_to_left_weight <= 1.0:
            raise ValueError("right_to_left_weight must be in [0, 1]")


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, config: AttentionDecoderConfig) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, config.num_heads, config.attention_dropout)
        self.cross_norm = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, config.num_heads, config.attention_dropout)
        self.ff_norm = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, config.ffn_dim, config.dropout, "relu")
        self.dropout = Dropout(config.dropout, inplace=True)  # on Linear outputs

    def forward(self, x, self_mask, memory, memory_mask) -> torch.Tensor:
        y = self.self_norm(x)
        x = x + self.dropout(self.self_attn(y, y, y, mask=self_mask))
        y = self.cross_norm(x)
        x = x + self.dropout(self.cross_attn(y, memory, memory, mask=memory_mask))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class TransformerDecoder(nn.Module):
    """Token embeddings + sinusoidal positions, pre-norm layers, output projection.

    forward: memory (B, T, D) with its mask (B, 1, 1, T), tokens (B, U), lengths (B,)
    -> logits (B, U, V).
    """

    def __init__(
        self, vocab_size: int, d_model: int, num_layers: int, config: AttentionDecoderConfig
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        self.dropout = Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(d_model, config) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, memory, memory_mask, tokens, lengths) -> torch.Tensor:
        steps = tokens.shape[1]
        x = self.embed(tokens) * math.sqrt(self.d_model)
        x = self.dropout(
            x + sinusoids(torch.arange(steps, device=x.device), self.d_model).to(x.dtype)
        )
        causal = torch.ones(steps, steps, dtype=torch.bool, device=x.device).tril()
        self_mask = causal[None, None] & lengths_to_mask(lengths, steps)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, self_mask, memory, memory_mask)
        return self.out(self.final_norm(x))


def teacher_forcing(tokens, lengths, sos_eos: int, reverse: bool = False):
    """([sos] + y, y + [eos]) per utterance, padded with eos and IGNORE_ID; y reversed when
    asked. tokens (B, U) -> (B, U+1) each."""
    batch, longest = tokens.shape
    ys_in = tokens.new_full((batch, longest + 1), sos_eos)
    ys_out = tokens.new_full((batch, longest + 1), IGNORE_ID)
    for row, length in enumerate(lengths.tolist()):
        sequence = tokens[row, :length]
        if reverse:
            sequence = sequence.flip(0)
        ys_in[row, 1 : length + 1] = sequence
        ys_out[row, :length] = sequence
        ys_out[row, length] = sos_eos
    return ys_in, ys_out


class AttentionHead(nn.Module):
    """loss_att = (1 - r) * left-to-right + r * right-to-left (r = 0 without the second
    decoder); each is label-smoothed cross-entropy summed over tokens, per utterance."""

    metrics: ClassVar[dict[str, Unit]] = {"loss_att": UTTERANCES}

    def __init__(
        self, input_dim: int, vocab_size: int, config: AttentionDecoderConfig, sos_eos_id: int
    ) -> None:
        super().__init__()
        self.weight = config.weight
        self.sos_eos_id = sos_eos_id
        self.label_smoothing = config.label_smoothing
        self.decoder = TransformerDecoder(vocab_size, input_dim, config.num_layers, config)
        self.reverse_decoder = None
        self.reverse_weight = 0.0
        if config.right_to_left_layers > 0:
            self.reverse_decoder = TransformerDecoder(
                vocab_size, input_dim, config.right_to_left_layers, config
            )
            self.reverse_weight = config.right_to_left_weight

    def _loss(self, decoder, memory, memory_mask, tokens, token_lens, reverse):
        ys_in, ys_out = teacher_forcing(tokens, token_lens, self.sos_eos_id, reverse)
        logits = decoder(memory, memory_mask, ys_in, token_lens + 1)
        loss = F.cross_entropy(
            logits.transpose(1, 2).float(),
            ys_out,
            ignore_index=IGNORE_ID,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        return loss, logits, ys_out

    def token_indexed(self) -> list[str]:
        """Parameters whose first dimension is indexed by token id (rows moved, not
        reloaded, when fine-tuning with another vocabulary)."""
        names = ["decoder.embed.weight", "decoder.out.weight", "decoder.out.bias"]
        if self.reverse_decoder is not None:
            names += [f"reverse_{name}" for name in names]
        return names

    def forward(
        self, encoded, encoded_lens, tokens, token_lens, *, with_accuracy: bool = False
    ) -> HeadOutput:
        memory_mask = lengths_to_mask(encoded_lens, encoded.shape[1])[:, None, None, :]
        loss, logits, ys_out = self._loss(
            self.decoder, encoded, memory_mask, tokens, token_lens, False
        )
        if self.reverse_decoder is not None:
            reverse, _, _ = self._loss(
                self.reverse_decoder, encoded, memory_mask, tokens, token_lens, True
            )
            loss = (1 - self.reverse_weight) * loss + self.reverse_weight * reverse
        accuracy = None
        if with_accuracy:
            # Teacher-forced: the next token right, given the true history (<eos> included).
            counted = ys_out != IGNORE_ID
            correct = (logits.detach().argmax(-1) == ys_out) & counted
            accuracy = Metric(float(correct.sum()), float(counted.sum()), TOKENS)
        batch = encoded.shape[0]
        return HeadOutput(loss, {"loss_att": metric(loss.detach(), batch, UTTERANCES)}, accuracy)
