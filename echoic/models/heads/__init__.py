"""Heads: each turns encoder output into a loss and declares its metric keys once.

Every head's forward takes encoder output (B, T, D), its lengths (B,), target
tokens (B, U) padded with -1 and their lengths (B,), and returns a `HeadOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rapidfuzz.distance import Levenshtein

from echoic.models.contract import TOKENS, Metric


@dataclass
class HeadOutput:
    loss: torch.Tensor  # differentiable sum over the batch's utterances
    metrics: dict[str, Metric]  # exactly the head's declared keys
    accuracy: Metric | None = None  # token accuracy, when asked for


def token_hits(references: list[list[int]], hypotheses: list[list[int]]) -> Metric:
    """Reference tokens matched by a minimum-edit alignment, over reference tokens.

    The accuracy of free-running output (greedy CTC or transducer), in [0, 1]: unlike
    1 - error rate it cannot go negative when the hypothesis has insertions.
    """
    hits = total = 0
    for ref, hyp in zip(references, hypotheses):
        errors = sum(1 for op in Levenshtein.editops(ref, hyp) if op.tag in ("replace", "delete"))
        hits += len(ref) - errors
        total += len(ref)
    return Metric(float(hits), float(total), TOKENS)


def unpad(tokens: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [row[:length].tolist() for row, length in zip(tokens, lengths.tolist())]
