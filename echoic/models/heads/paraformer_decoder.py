"""Paraformer's non-autoregressive decoder: every token predicted in one parallel pass.

Its input is one embedding per token from the CIF predictor (echoic.models.cif), not the
previous tokens, so self-attention needs no causal mask: each position sees all the
utterance's positions (padding masked) and, through cross-attention, the encoder
output. The layers are the attention head's pre-norm DecoderLayer; there are no
positional encodings, as in FunASR's ParaformerSANDecoder: the embeddings come in time
order from the audio, and the second pass of glancing training feeds target-token
embeddings from `embed` at some positions (echoic.models.glm).

Shapes: B batch, N token positions, T encoder frames, D width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from echoic.models.heads.attention import AttentionDecoderConfig, DecoderLayer
from echoic.models.layers import MultiHeadAttention, lengths_to_mask


@dataclass(frozen=True)
class ParaformerDecoderConfig:
    num_layers: int = 6
    num_heads: int = 4
    ffn_dim: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"paraformer decoder num_layers must be >= 1, got {self.num_layers}")


class ParaformerDecoder(nn.Module):
    """forward: token embeddings (B, N, D) and their counts (B,), encoder output
    (B, T, D) and its lengths (B,) -> logits (B, N, V)."""

    def __init__(
        self,
        input_dim: int,
        vocab_size: int,
        config: ParaformerDecoderConfig,
        *,
        contextual: bool = False,
    ) -> None:
        super().__init__()
        # DecoderLayer reads only these fields of the attention head's config.
        layer_config = AttentionDecoderConfig(
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            ffn_dim=config.ffn_dim,
            dropout=config.dropout,
            attention_dropout=config.attention_dropout,
        )
        # Target-token embeddings, used only as glancing input in training.
        self.embed = nn.Embedding(vocab_size, input_dim)
        self.layers = nn.ModuleList(
            DecoderLayer(input_dim, layer_config) for _ in range(config.num_layers)
        )
        # A contextual Paraformer (echoic.models.bias): after the layers, attention to the
        # hotword embeddings, added to the states.
        self.bias_norm = self.bias_attn = None
        if contextual:
            self.bias_norm = nn.LayerNorm(input_dim)
            self.bias_attn = MultiHeadAttention(
                input_dim, config.num_heads, config.attention_dropout
            )
        self.final_norm = nn.LayerNorm(input_dim)
        self.out = nn.Linear(input_dim, vocab_size)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) token ids, padding -1 -> (B, N, D) (padding embeds as token 0, to be
        masked by the caller)."""
        return self.embed(tokens.clamp(min=0))

    def token_indexed(self) -> list[str]:
        """Parameters whose first dimension is indexed by token id (rows moved, not
        reloaded, when fine-tuning with another vocabulary)."""
        return ["embed.weight", "out.weight", "out.bias"]

    def forward(
        self,
        embeddings: torch.Tensor,
        lengths: torch.Tensor,
        memory: torch.Tensor,
        memory_lens: torch.Tensor,
        *,
        bias: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """-> logits (B, N, V); see `states`."""
        return self.out(self.states(embeddings, lengths, memory, memory_lens, bias=bias))

    def states(
        self,
        embeddings: torch.Tensor,
        lengths: torch.Tensor,
        memory: torch.Tensor,
        memory_lens: torch.Tensor,
        *,
        bias: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The normalised states (B, N, D) the output layer reads. `bias`: hotword
        memory (B, K + 1, D) and its mask, for a contextual decoder."""
        positions = embeddings.shape[1]
        if embeddings.shape[0] != memory.shape[0] or embeddings.shape[2] != memory.shape[2]:
            raise ValueError(
                f"embeddings {tuple(embeddings.shape)} and memory {tuple(memory.shape)} "
                "must share batch and width"
            )
        keys = lengths_to_mask(lengths, positions)
        # An utterance that fired no token has no key to attend to. torch 2.13's CPU
        # attention returns 0 for such a row, but not every backend promises that, and a
        # NaN there would reach the weights' gradients. Let the row see its (zero)
        # padding instead: its outputs are never read.
        keys = keys | (lengths == 0)[:, None]
        self_mask = keys[:, None, None, :]
        memory_mask = lengths_to_mask(memory_lens, memory.shape[1])[:, None, None, :]
        x = embeddings.to(memory.dtype)
        for layer in self.layers:
            x = layer(x, self_mask, memory, memory_mask)
        if self.bias_attn is not None:
            if bias is None:
                raise ValueError("a contextual decoder needs the hotword memory")
            hotwords, hotword_mask = bias
            y = self.bias_norm(x)
            x = x + self.bias_attn(y, hotwords.to(x.dtype), hotwords.to(x.dtype), mask=hotword_mask)
        return self.final_norm(x)
