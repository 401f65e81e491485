"""Glancing language model (GLM) sampling for Paraformer's two-pass training.

A first, gradient-free decoder pass predicts every token from the CIF embeddings. The
further its output is from the target (Hamming distance d), the more target-token
embeddings replace acoustic ones in the second pass's input: ratio * d positions, picked
at random. The decoder thus learns to use the context of some true tokens, most while
it is still poor (arXiv 2206.08317, after GLAT).

Which positions are picked is a pure function of (seed, epoch, utterance id), as every
random choice in echoic's data path is (echoic.seeding): the same utterance gets the same
positions whatever batch it lands in, at whatever row, on whatever rank, and a resumed
run repeats the choices exactly. The count depends only on the first pass's predictions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from echoic.models.layers import lengths_to_mask
from echoic.seeding import make_rng

GLANCING = "glancing"  # the purpose in the seed, so no other draw shares the stream

# ratio * d in floating point can land just under an integer (0.29 * 100 = 28.999...);
# this keeps the floor at the count the arithmetic means.
_COUNT_EPSILON = 1e-9


def glancing_count(wrong: int, ratio: float) -> int:
    """floor(ratio * wrong): FunASR truncates the same way, so a single wrong token at
    ratio < 1 reveals nothing."""
    return math.floor(ratio * wrong + _COUNT_EPSILON)


def glancing_mask(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    lengths: torch.Tensor,
    ids: Sequence[str],
    *,
    ratio: float,
    seed: int,
    epoch: int,
) -> torch.Tensor:
    """Positions whose decoder input becomes the target token's embedding.

    predictions (B, N) first-pass argmax, targets (B, N) padded with -1, lengths (B,),
    ids: the batch's utterance ids. Returns (B, N) bool, True at the replaced positions:
    glancing_count(d, ratio) of them per utterance, d = positions < length where the
    prediction is wrong, chosen among all its positions (right or wrong, as FunASR and
    GLAT do). The choice takes the first positions of a permutation drawn from
    (seed, epoch, id), so a larger count only adds positions to a smaller one's.
    """
    if predictions.shape != targets.shape or targets.dim() != 2:
        raise ValueError(
            f"predictions and targets must both be (B, N), got {tuple(predictions.shape)} "
            f"and {tuple(targets.shape)}"
        )
    batch, width = targets.shape
    if len(ids) != batch or lengths.shape != (batch,):
        raise ValueError(
            f"{batch} utterances in the batch, but {len(ids)} ids and "
            f"lengths of shape {tuple(lengths.shape)}"
        )
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"glancing ratio must be in [0, 1], got {ratio}")
    valid = lengths_to_mask(lengths, width)
    wrong = ((predictions != targets) & valid).sum(dim=1).tolist()
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for row, (utt_id, length, errors) in enumerate(zip(ids, lengths.tolist(), wrong)):
        count = glancing_count(errors, ratio)
        if count == 0:
            continue
        order = make_rng(seed, epoch, utt_id, GLANCING).permutation(int(length))
        mask[row, torch.from_numpy(order[:count])] = True
    return mask.to(targets.device)


def glance(
    acoustic: torch.Tensor, target_embeddings: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The second pass's input: target embeddings where mask is True, acoustic ones
    elsewhere. (B, N, D), (B, N, D), (B, N) -> (B, N, D)."""
    return torch.where(mask[..., None], target_embeddings.to(acoustic.dtype), acoustic)
