"""Continuous integrate-and-fire (CIF): Paraformer's token-count predictor.

A small network gives every encoder frame a weight alpha in [0, 1]. Walking along time,
the weights are accumulated; each time the total crosses the threshold (1.0) a token
"fires", and its acoustic embedding is the alpha-weighted sum of the frames since the
previous firing. A frame whose weight crosses the threshold is split: the part that
completes the token goes to it, the rest starts the next one. So the sum of alpha is
the predicted number of tokens, and one embedding per token comes out, for a decoder
that then predicts every token in one parallel pass (arXiv 2206.08317).

Shapes: B batch, T encoder frames, D width, N tokens (fired embeddings).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from echoic.models.layers import Dropout, lengths_to_mask

# Scaled weights sum to the target length only up to float32 rounding (4.9999995 for 5);
# without a tolerance the last token would not fire and training would see one token too
# few. The integration itself runs in float64 for the same reason (a cumulative sum over
# hundreds of frames), so this tolerance is far above any rounding and far below the
# weight of a real frame.
FIRE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class CifConfig:
    left_context: int = 1  # frames before each frame the convolution sees (FunASR l_order)
    right_context: int = 1  # frames after it (FunASR r_order); kernel = left + right + 1
    threshold: float = 1.0  # accumulated weight per token
    dropout: float = 0.1  # on the convolution's output, before the ReLU
    smooth_factor: float = 1.0  # alpha = relu(sigmoid * smooth_factor - noise_threshold)
    noise_threshold: float = 0.0  # weights below this (after smoothing) become exactly 0
    # Weight added after the last real frame at inference, so that a last token whose
    # integration stopped short (speech ends before the weights reach the threshold)
    # still fires when it has gathered at least threshold - tail_threshold (0.55 with
    # FunASR's 0.45); less is dropped as noise. 0 turns it off.
    tail_threshold: float = 0.45

    def __post_init__(self) -> None:
        if self.left_context < 0 or self.right_context < 0:
            raise ValueError("CIF left_context and right_context must be >= 0")
        if self.threshold <= 0:
            raise ValueError(f"CIF threshold must be > 0, got {self.threshold}")
        if not 0.0 <= self.tail_threshold < self.threshold:
            raise ValueError("CIF tail_threshold must be in [0, threshold)")
        if self.smooth_factor <= 0 or self.noise_threshold < 0:
            raise ValueError("CIF smooth_factor must be > 0 and noise_threshold >= 0")


@dataclass
class Fired:
    """What integrate-and-fire emits."""

    embeddings: torch.Tensor  # (B, N, D) float32, zero beyond each utterance's count
    counts: torch.Tensor  # (B,) int64: tokens fired per utterance
    positions: torch.Tensor  # (B, N) int64: the frame each token fired at, -1 beyond count


def integrate_and_fire(
    hidden: torch.Tensor,
    alphas: torch.Tensor,
    threshold: float = 1.0,
    *,
    min_tokens: int = 0,
    width: int | None = None,
) -> Fired:
    """Integrate frames (B, T, D) with weights alphas (B, T) >= 0 into tokens.

    Token k (from 0) collects, from every frame t, the part of the frame's weight that
    falls between k * threshold and (k + 1) * threshold on the running sum of weights,
    and fires at the first frame where the running sum reaches (k + 1) * threshold. A
    frame that crosses a boundary is thereby split between two tokens, exactly as the
    loop of the paper and FunASR does it. Computing the overlaps directly (rather than
    looping over time) also splits a frame whose weight exceeds the threshold over
    several tokens, which the one-firing-per-frame loop cannot do; that only happens in
    training, when weights are scaled up to a long target. A remainder below the
    threshold after the last firing makes no token (see CifConfig.tail_threshold).

    `min_tokens` pads N to at least this (training passes the longest target, so shapes
    match the targets even for an utterance that fired nothing). `width` fixes N
    instead, without reading the counts: the ONNX export passes the frame count, a
    bound on the tokens when no frame weighs more than the threshold, so the graph's
    shapes do not depend on the data.
    Differentiable in hidden and alphas.
    """
    if hidden.dim() != 3 or alphas.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden (B, T, D) and alphas (B, T) expected, got "
            f"{tuple(hidden.shape)} and {tuple(alphas.shape)}"
        )
    batch, frames, _ = hidden.shape
    # Running sum in units of tokens, after (cum) and before (prior) each frame.
    cum = alphas.double().cumsum(dim=1) / threshold
    prior = F.pad(cum, (1, 0))[:, :frames]
    total = cum[:, -1] if frames else alphas.new_zeros(batch, dtype=torch.float64)
    counts = torch.floor(total + FIRE_TOLERANCE).long()
    if width is None:
        width = max(int(counts.max()) if batch else 0, min_tokens)
    k = torch.arange(width, device=alphas.device, dtype=torch.float64)[None, :, None]
    # share[b, k, t]: the part of frame t's weight that belongs to token k.
    upper = torch.minimum(cum[:, None, :], k + 1)
    lower = torch.maximum(prior[:, None, :], k)
    share = (upper - lower).clamp(min=0.0) * threshold
    fired = k[..., 0] < counts[:, None]  # (B, N) tokens that exist
    share = share * fired[..., None]
    embeddings = torch.matmul(share.float(), hidden.float())
    # Frames before token k's firing frame are those whose running sum is still short of
    # its boundary; the tolerance matches the one the count used.
    before = (cum[:, None, :] < k + 1 - FIRE_TOLERANCE).sum(dim=2)
    positions = torch.where(fired, before, torch.full_like(before, -1))
    return Fired(embeddings, counts, positions)


def append_tail(
    hidden: torch.Tensor, alphas: torch.Tensor, lengths: torch.Tensor, tail: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference only: one zero frame after each utterance's last real frame (at index
    lengths[b], the first padded one) carrying weight `tail`, so a last token left just
    short of the threshold still fires (FunASR's tail_threshold, 0.45). That frame is
    zeroed (a padded frame of a shorter utterance holds whatever the encoder left
    there), so the tail adds weight to the token, not content. Padded alphas must be 0.
    (B, T, D), (B, T) -> (B, T + 1, D), (B, T + 1)."""
    batch, frames, dim = hidden.shape
    hidden = torch.cat([hidden, hidden.new_zeros(batch, 1, dim)], dim=1)
    hidden = hidden.masked_fill(~lengths_to_mask(lengths, frames + 1)[..., None], 0.0)
    # A comparison, not F.one_hot: one_hot's class count would fix the time axis in an
    # exported graph.
    frame = torch.arange(frames + 1, device=lengths.device)
    extra = (frame[None, :] == lengths[:, None]).to(alphas.dtype) * tail
    return hidden, F.pad(alphas, (0, 1)) + extra


@dataclass
class CifOutput:
    embeddings: torch.Tensor  # (B, N, D) one acoustic embedding per token, float32
    counts: torch.Tensor  # (B,) int64 tokens fired (= target lengths when given)
    positions: torch.Tensor  # (B, N) int64 firing frame per token, -1 beyond counts
    alphas: torch.Tensor  # (B, T) the weights integrated (scaled when targets are given)
    predicted: torch.Tensor  # (B,) sum of the unscaled weights: the predicted count


class CifPredictor(nn.Module):
    """Encoder output (B, T, D) -> frame weights -> fired token embeddings.

    The weights come from a depthwise convolution over left_context + 1 + right_context
    frames with a residual connection, ReLU, a linear map to one value and a sigmoid
    (FunASR's CifPredictor; its V2 uses a full convolution without the residual).
    Padded frames are zeroed before the convolution, so they cannot change the weights
    of real frames next to them, and get weight 0.
    """

    def __init__(self, input_dim: int, config: CifConfig) -> None:
        super().__init__()
        self.config = config
        kernel = config.left_context + config.right_context + 1
        self.conv = nn.Conv1d(input_dim, input_dim, kernel, groups=input_dim)
        self.dropout = Dropout(config.dropout)
        self.proj = nn.Linear(input_dim, 1)

    @property
    def max_tokens_per_frame(self) -> float:
        """The most tokens one frame's weight can complete at inference: at most 1 keeps
        the count within the frames, which a fixed-width pass relies on."""
        heaviest = max(self.config.smooth_factor - self.config.noise_threshold, 0.0)
        return max(heaviest, self.config.tail_threshold) / self.config.threshold

    def weights(self, encoded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, D), (B,) -> alphas (B, T) in [0, 1], 0 at padded frames."""
        valid = lengths_to_mask(lengths, encoded.shape[1])
        x = encoded.float().masked_fill(~valid[..., None], 0.0).transpose(1, 2)  # (B, D, T)
        context = F.pad(x, (self.config.left_context, self.config.right_context))
        y = torch.relu(self.dropout(self.conv(context) + x)).transpose(1, 2)
        alphas = torch.sigmoid(self.proj(y)[..., 0])
        if self.config.smooth_factor != 1.0 or self.config.noise_threshold > 0.0:
            alphas = torch.relu(alphas * self.config.smooth_factor - self.config.noise_threshold)
        return alphas * valid

    def forward(
        self,
        encoded: torch.Tensor,
        lengths: torch.Tensor,
        target_lengths: torch.Tensor | None = None,
        *,
        fixed_width: bool = False,
    ) -> CifOutput:
        """Training and validation pass target_lengths (B,): the weights are scaled so
        each utterance fires exactly its target's number of tokens, which the decoder's
        cross-entropy needs; `predicted` (the unscaled sum) feeds the quantity loss.
        Decoding passes none: the weights are used as predicted, with the tail.
        `fixed_width` (decoding for export): N is the frame count + 1 whatever fires,
        so no shape depends on the data (see `max_tokens_per_frame`)."""
        # Weights are summed over hundreds of frames: keep them out of reduced precision.
        with torch.autocast(encoded.device.type, enabled=False):
            alphas = self.weights(encoded, lengths)
            predicted = alphas.sum(dim=1)
            hidden = encoded.float()
            if target_lengths is not None:
                alphas = scale_to_targets(alphas, lengths, target_lengths)
                fired = integrate_and_fire(
                    hidden,
                    alphas,
                    self.config.threshold,
                    min_tokens=int(target_lengths.max()) if len(target_lengths) else 0,
                )
            else:
                tail = self.config.tail_threshold
                if tail > 0.0:
                    hidden, tailed = append_tail(hidden, alphas, lengths, tail)
                else:
                    tailed = alphas
                width = hidden.shape[1] if fixed_width else None
                fired = integrate_and_fire(hidden, tailed, self.config.threshold, width=width)
        positions = fired.positions
        if target_lengths is None:
            # A token fired by the tail weight fires on the frame after the audio: it
            # belongs to the last real frame.
            last = (lengths.long() - 1).clamp(min=0)[:, None]
            positions = torch.where(positions >= 0, torch.minimum(positions, last), positions)
        return CifOutput(fired.embeddings, fired.counts, positions, alphas, predicted)


def scale_to_targets(
    alphas: torch.Tensor, lengths: torch.Tensor, target_lengths: torch.Tensor
) -> torch.Tensor:
    """alphas (B, T) scaled so each row sums to its target length (B,).

    The scale factor is not detached (as in FunASR): the decoder's loss then also reaches
    the weights' shape. A row whose weights are all 0 (possible with noise_threshold)
    cannot be scaled; it gets uniform weights over its frames instead, so it still fires
    its target's number of tokens.
    """
    valid = lengths_to_mask(lengths, alphas.shape[1])
    total = alphas.sum(dim=1, keepdim=True)
    uniform = valid.to(alphas.dtype) / lengths.clamp(min=1)[:, None].to(alphas.dtype)
    usable = torch.where(total > 0, alphas, uniform)
    scale = target_lengths.to(alphas.dtype)[:, None] / usable.sum(dim=1, keepdim=True).clamp(
        min=torch.finfo(alphas.dtype).tiny
    )
    return usable * scale


def quantity_loss(predicted: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """The paper's quantity loss, L1: sum over the batch of |predicted - target| per
    utterance (FunASR's mae_loss before it divides). A sum over utterances, like every
    echoic head loss, so the trainer's one division by the utterance count gives the
    per-utterance mean whatever the batch is split into. (B,), (B,) -> scalar."""
    return (predicted - target_lengths.to(predicted.dtype)).abs().sum()


def token_times(
    positions: Sequence[int], frame_shift: float, duration: float
) -> list[tuple[float, float]]:
    """(start, end) seconds per token of one utterance from its firing frames.

    CIF says where a token ends (the frame whose weight completes it), not where it
    starts, so tokens tile the time axis: token k ends at the end of its firing frame
    and starts where token k - 1 ended (the first at 0, so leading silence belongs to
    it). Ends are clipped to `duration`, so every interval lies inside the audio and
    starts and ends never decrease. frame_shift: seconds per encoder frame (after
    subsampling, e.g. 0.04).
    """
    if frame_shift <= 0 or duration < 0 or not math.isfinite(duration):
        raise ValueError(
            f"token_times needs frame_shift > 0 and duration >= 0, got {frame_shift} and {duration}"
        )
    times = []
    start = 0.0
    previous = -1
    for position in positions:
        position = int(position)
        if position < previous:
            raise ValueError(f"firing positions must not decrease, got {list(positions)}")
        previous = position
        end = min((position + 1) * frame_shift, duration)
        times.append((start, end))
        start = end
    return times


@dataclass(frozen=True)
class Decoded:
    """One utterance's one-pass result."""

    tokens: tuple[int, ...]
    score: float  # sum of the chosen tokens' log-probabilities
    times: tuple[tuple[float, float], ...]  # (start, end) seconds per token


def decoded_rows(
    tokens: torch.Tensor,
    scores: torch.Tensor,
    counts: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor,
    frame_shift: float,
) -> list[Decoded]:
    """The one pass's tensors (from PyTorch or the exported graph) -> one Decoded per
    utterance: its first `count` positions, their summed log-probability and times."""
    results = []
    for row, count in enumerate(counts.tolist()):
        duration = float(lengths[row]) * frame_shift
        results.append(
            Decoded(
                tuple(tokens[row, :count].tolist()),
                float(scores[row, :count].sum()),
                tuple(token_times(positions[row, :count].tolist(), frame_shift, duration)),
            )
        )
    return results
