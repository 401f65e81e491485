"""Encoders: Conformer and Transformer, with conv2d subsampling by 4, 6 or 8 (fbank
frames) or a linear / conv1d front keeping 1x or reducing 2x (self-supervised frames).

An encoder is built from its config and the frontend's `output_dim` and frame shift
(never typed in a config) and reports its own `output_dim`, `subsampling` factor and
the shortest input it can take (`min_input_frames`). `subsampling: auto` (the
default) reduces the frontend's frames to 40 ms: 4x for 10 ms fbank, 2x for the
20 ms frames of wav2vec2-style models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from echoic.config import one_of
from echoic.errors import ConfigError
from echoic.models.layers import (
    ConvModule,
    Dropout,
    FeedForward,
    Linear,
    MultiHeadAttention,
    RelativePositions,
    lengths_to_mask,
    rotary_tables,
    sinusoids,
    strided_conv2d,
    strided_input_length,
    strided_lengths,
)

# (kernel, stride) of each conv2d layer, per subsampling factor.
_SUBSAMPLING_LAYERS = {4: ((3, 2), (3, 2)), 6: ((3, 2), (5, 3)), 8: ((3, 2), (3, 2), (3, 2))}
# Over wide self-supervised features (768 and up) a conv2d over the feature axis would
# be huge and pointless: 1x is a linear map, 2x one conv1d over time.
_TIME_ONLY_LAYERS = {1: ((1, 1),), 2: ((3, 2),)}
TARGET_FRAME_SHIFT = 0.04  # seconds per encoder frame that `subsampling: auto` aims at

Subsampling = Literal["auto", 1, 2, 4, 6, 8]


@dataclass(frozen=True)
class ConformerConfig:
    d_model: int = 256  # width of every block
    num_layers: int = 12
    num_heads: int = 4
    ffn_dim: int = 1024  # hidden width of each of the two (macaron) feed-forward modules
    conv_kernel: int = 15  # depthwise convolution width, odd
    conv_norm: Literal["batch_norm", "layer_norm"] = "batch_norm"
    positional: Literal["rel_pos", "rope"] = "rel_pos"  # rel_pos: Transformer-XL (as the paper)
    # time reduction of the front: auto (to 40 ms frames, from the frontend's frame shift),
    # 4, 6, 8 (conv2d, for fbank), 1 or 2 (linear / conv1d, for self-supervised features)
    subsampling: Subsampling = "auto"
    subsampling_channels: int | None = None  # conv2d channels; None means d_model
    dropout: float = 0.1  # on block outputs, feed-forward hidden units and positions
    attention_dropout: float = 0.0  # on attention weights
    # Never needed: the input width is the frontend's output_dim. A value here is only
    # checked against it, before the first step.
    input_dim: int | None = None

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}"
            )
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd, got {self.conv_kernel}")


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int = 256
    num_layers: int = 12
    num_heads: int = 4
    ffn_dim: int = 2048
    positional: Literal["absolute", "rel_pos", "rope"] = "absolute"  # absolute: sinusoids added
    subsampling: Subsampling = "auto"  # as ConformerConfig's
    subsampling_channels: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    input_dim: int | None = None  # as ConformerConfig's: only checked

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}"
            )


@dataclass(frozen=True)
class SanmConfig:
    """SAN-M (FunASR's Paraformer encoder, arXiv 2006.01713): self-attention whose value
    path also feeds a memory block, a depthwise convolution over time (FSMN), added to
    the attention's output; then a feed-forward module. The memory block gives
    positions, so no positional encoding is needed (`positional: none`), though
    sinusoids can be added as FunASR does (`absolute`)."""

    d_model: int = 256
    num_layers: int = 12
    num_heads: int = 4
    ffn_dim: int = 1024
    fsmn_kernel: int = 11  # frames the memory block sees, odd (centred)
    positional: Literal["absolute", "none"] = "absolute"
    subsampling: Subsampling = "auto"  # as ConformerConfig's
    subsampling_channels: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    input_dim: int | None = None  # as ConformerConfig's: only checked

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}"
            )
        if self.fsmn_kernel % 2 == 0:
            raise ValueError(f"fsmn_kernel must be odd, got {self.fsmn_kernel}")


BlockConfig = ConformerConfig | TransformerConfig | SanmConfig


@dataclass(frozen=True)
class EncoderConfig:
    """Exactly one kind; a Conformer when none is given."""

    conformer: ConformerConfig | None = None
    transformer: TransformerConfig | None = None
    san_m: SanmConfig | None = None

    def __post_init__(self) -> None:
        one_of(
            self, ["conformer", "transformer", "san_m"], default={"conformer": ConformerConfig()}
        )

    @property
    def kind(self) -> BlockConfig:
        return self.conformer or self.transformer or self.san_m


class Conv2dSubsampling(nn.Module):
    """Conv2d layers (ReLU) over (time, frequency), then a linear map to d_model.

    Runs in channels_last layout, weights included (a weight left in the default
    layout makes oneDNN reorder the activations): its convolutions, their backward
    especially, are about 1.4x faster that way on CPU, and the (B, C, T', F') output is
    then physically (B, T', F', C), so flattening to (B, T', F'*C) needs no copy.
    (B, T, F) -> (B, T', d_model).
    """

    def __init__(
        self, input_dim: int, d_model: int, factor: int, channels: int | None = None
    ) -> None:
        super().__init__()
        if factor not in _SUBSAMPLING_LAYERS:
            raise ValueError(f"subsampling must be 4, 6 or 8, got {factor}")
        channels = channels or d_model
        self.layers = _SUBSAMPLING_LAYERS[factor]
        self.convs = nn.ModuleList()
        freq = input_dim
        in_channels = 1
        for kernel, stride in self.layers:
            conv = nn.Conv2d(in_channels, channels, kernel, stride)
            self.convs.append(conv.to(memory_format=torch.channels_last))
            freq = (freq - kernel) // stride + 1
            in_channels = channels
        if freq < 1:
            raise ValueError(f"input_dim {input_dim} is too small for subsampling by {factor}")
        self.linear = Linear(channels * freq, d_model)
        self.factor = factor
        self.min_input_frames = self.input_frames_for(1)

    def input_frames_for(self, outputs: int) -> int:
        """The fewest input frames that give `outputs` output frames."""
        return strided_input_length(outputs, self.layers)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return strided_lengths(lengths, self.layers)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.unsqueeze(1).contiguous(memory_format=torch.channels_last)
        for conv in self.convs:
            # relu_ in place: the conv's output is not needed for its backward
            x = torch.relu_(strided_conv2d(x, conv))
        batch, channels, frames, freq = x.shape
        x = x.permute(0, 2, 3, 1).reshape(batch, frames, freq * channels)
        return self.linear(x), self.output_lengths(lengths)


class TimeSubsampling(nn.Module):
    """A linear map (1x) or one conv1d over time, kernel 3 stride 2, then ReLU and a
    linear map (2x). (B, T, F) -> (B, T', d_model). Same interface as Conv2dSubsampling."""

    def __init__(self, input_dim: int, d_model: int, factor: int) -> None:
        super().__init__()
        if factor not in _TIME_ONLY_LAYERS:
            raise ValueError(f"time-only subsampling must be 1 or 2, got {factor}")
        self.layers = _TIME_ONLY_LAYERS[factor]
        self.factor = factor
        ((kernel, stride),) = self.layers
        self.conv = nn.Conv1d(input_dim, d_model, kernel, stride) if factor > 1 else None
        self.linear = nn.Linear(d_model if factor > 1 else input_dim, d_model)
        self.min_input_frames = self.input_frames_for(1)

    def input_frames_for(self, outputs: int) -> int:
        return strided_input_length(outputs, self.layers)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return strided_lengths(lengths, self.layers)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.conv is not None:
            x = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.linear(x), self.output_lengths(lengths)


def subsampling_factor(config: BlockConfig, frame_shift: float) -> int:
    """The configured factor, or for `auto` the one that makes `frame_shift`-second input
    frames 40 ms encoder frames (4 for 10 ms fbank, 2 for 20 ms SSL frames)."""
    if config.subsampling != "auto":
        return config.subsampling
    factor = round(TARGET_FRAME_SHIFT / frame_shift)
    if factor not in (1, 2, 4, 6, 8) or abs(factor * frame_shift - TARGET_FRAME_SHIFT) > 1e-3:
        raise ConfigError(
            f"subsampling auto has no factor for {frame_shift * 1000:g} ms input frames "
            "(it knows 1, 2, 4, 6, 8 to reach 40 ms): set the encoder's subsampling"
        )
    return factor


class ConformerBlock(nn.Module):
    """x + 1/2 FF(x); x + MHSA(x); x + Conv(x); x + 1/2 FF(x); LayerNorm (pre-norm inside)."""

    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.ff_in_norm, self.ff_in = (
            nn.LayerNorm(d),
            FeedForward(d, config.ffn_dim, config.dropout, "swish"),
        )
        self.attn_norm = nn.LayerNorm(d)
        self.attn = MultiHeadAttention(
            d, config.num_heads, config.attention_dropout, config.positional
        )
        self.conv_norm, self.conv = (
            nn.LayerNorm(d),
            ConvModule(d, config.conv_kernel, config.conv_norm),
        )
        self.ff_out_norm, self.ff_out = (
            nn.LayerNorm(d),
            FeedForward(d, config.ffn_dim, config.dropout, "swish"),
        )
        self.final_norm = nn.LayerNorm(d)
        # Every module here ends in a Linear, whose output its backward never reads.
        self.dropout = Dropout(config.dropout, inplace=True)

    def forward(self, x, valid, attn_mask, positions) -> torch.Tensor:
        x = torch.add(x, self.dropout(self.ff_in(self.ff_in_norm(x))), alpha=0.5)
        y = self.attn_norm(x)
        x = x + self.dropout(self.attn(y, y, y, mask=attn_mask, positions=positions))
        x = x + self.dropout(self.conv(self.conv_norm(x), valid))
        x = torch.add(x, self.dropout(self.ff_out(self.ff_out_norm(x))), alpha=0.5)
        return self.final_norm(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention and feed-forward, each with a residual."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        d = config.d_model
        positional = "none" if config.positional == "absolute" else config.positional
        self.attn_norm = nn.LayerNorm(d)
        self.attn = MultiHeadAttention(d, config.num_heads, config.attention_dropout, positional)
        self.ff_norm, self.ff = (
            nn.LayerNorm(d),
            FeedForward(d, config.ffn_dim, config.dropout, "relu"),
        )
        self.dropout = Dropout(config.dropout, inplace=True)  # on Linear outputs

    def forward(self, x, valid, attn_mask, positions) -> torch.Tensor:
        y = self.attn_norm(x)
        x = x + self.dropout(self.attn(y, y, y, mask=attn_mask, positions=positions))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class SanmBlock(nn.Module):
    """x + MHSA(y) + FSMN(V(y)) with y = LayerNorm(x); x + FF(LayerNorm(x)). The memory
    block reads the attention's own value projection; padded frames are zeroed before
    its convolution, so they never reach real ones."""

    def __init__(self, config: SanmConfig) -> None:
        super().__init__()
        d = config.d_model
        self.attn_norm = nn.LayerNorm(d)
        self.attn = MultiHeadAttention(d, config.num_heads, config.attention_dropout, "none")
        self.fsmn = nn.Conv1d(
            d, d, config.fsmn_kernel, padding=config.fsmn_kernel // 2, groups=d, bias=False
        )
        self.ff_norm, self.ff = (
            nn.LayerNorm(d),
            FeedForward(d, config.ffn_dim, config.dropout, "relu"),
        )
        self.dropout = Dropout(config.dropout, inplace=True)  # on Linear outputs

    def forward(self, x, valid, attn_mask, positions) -> torch.Tensor:
        y = self.attn_norm(x)
        values = self.attn.value(y).masked_fill(~valid[..., None], 0.0)
        memory = values + self.fsmn(values.transpose(1, 2)).transpose(1, 2)
        x = x + self.dropout(self.attn(y, y, y, mask=attn_mask)) + self.dropout(memory)
        return x + self.dropout(self.ff(self.ff_norm(x)))


class Encoder(nn.Module):
    """Subsampling, positions, a stack of blocks, a final LayerNorm.

    forward: feats (B, T, F), lengths (B,) -> (B, T', D), lengths (B,).
    """

    def __init__(
        self,
        config: BlockConfig,
        input_dim: int,
        frame_shift: float = 0.01,
        input_source: str = "the frontend",
    ) -> None:
        """`input_dim` and `frame_shift` (seconds) are the frontend's; `input_source` says
        where its width came from, for the error when the config's `input_dim` differs."""
        super().__init__()
        if config.input_dim is not None and config.input_dim != input_dim:
            kind = {ConformerConfig: "conformer", TransformerConfig: "transformer"}.get(
                type(config), "san_m"
            )
            raise ConfigError(
                f"model.encoder.{kind}.input_dim is {config.input_dim}, but the frontend "
                f"gives {input_dim} ({input_source}): delete input_dim from the config "
                "(the encoder always takes the frontend's width)"
            )
        self.config = config
        self.output_dim = config.d_model
        factor = subsampling_factor(config, frame_shift)
        if factor in _TIME_ONLY_LAYERS:
            if config.subsampling_channels is not None:
                raise ConfigError(
                    f"subsampling_channels sets the conv2d front of 4x, 6x and 8x; this "
                    f"encoder subsamples {factor}x ({input_source}, {frame_shift * 1000:g} ms "
                    "frames): remove it"
                )
            self.subsampling = TimeSubsampling(input_dim, config.d_model, factor)
        else:
            self.subsampling = Conv2dSubsampling(
                input_dim, config.d_model, factor, config.subsampling_channels
            )
        self.min_input_frames = self.subsampling.min_input_frames
        self.frame_shift = frame_shift * factor  # seconds per output frame
        self.positional = config.positional
        self.input_dropout = Dropout(config.dropout)
        if config.positional == "rel_pos":
            self.relative_positions = RelativePositions(config.d_model, config.dropout)
        block = {ConformerConfig: ConformerBlock, TransformerConfig: TransformerBlock}.get(
            type(config), SanmBlock
        )
        self.blocks = nn.ModuleList(block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        # Recompute each block in backward to save memory: a training-time choice the
        # trainer sets (train.gradient_checkpointing), not part of the architecture.
        self.gradient_checkpointing = False

    def attention_positions(
        self, frames: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """What every block's attention takes as `positions` for `frames` encoder frames:
        the (2T-1, D) relative encodings for rel_pos, the (cos, sin) tables for rope,
        None for absolute (added to the input instead)."""
        if self.positional == "rel_pos":
            return self.relative_positions(frames, device).to(dtype)
        if self.positional == "rope":
            return rotary_tables(frames, self.config.d_model // self.config.num_heads, device)
        return None

    def forward(
        self, feats: torch.Tensor, lengths: torch.Tensor, static: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`static=True` (export) leaves out the branches that depend on the data: the
        length check, and skipping the mask when nothing is padded."""
        shortest = self.min_input_frames if static else int(lengths.min())
        if shortest < self.min_input_frames:
            raise ValueError(
                f"an input of {shortest} frames is too short for subsampling by "
                f"{self.subsampling.factor} (needs at least {self.min_input_frames} frames)"
            )
        x, lengths = self.subsampling(feats, lengths)
        _, frames, d_model = x.shape
        x = x * math.sqrt(d_model)
        if self.positional == "absolute":
            x = x + sinusoids(torch.arange(frames, device=x.device), d_model).to(x.dtype)
        positions = self.attention_positions(frames, x.device, x.dtype)
        x = self.input_dropout(x)
        valid = lengths_to_mask(lengths, frames)
        # No mask at all when nothing is padded lets SDPA take its fastest path.
        attn_mask = valid[:, None, None, :] if static or not bool(valid.all()) else None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, valid, attn_mask, positions, use_reentrant=False)
            else:
                x = block(x, valid, attn_mask, positions)
        return self.final_norm(x), lengths
