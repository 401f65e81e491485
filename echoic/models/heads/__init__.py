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


def token_accuracy(references: list[list[int]], hypotheses: list[list[int]]) -> Metric:
    """1 - token error rate of free-running output (greedy CTC or transducer).

    Per utterance max(0, N - edits) over N reference tokens, so it stays in [0, 1] and,
    unlike counting matched tokens, an untrained model's long random output scores
    near 0 rather than matching many tokens by chance.
    """
    correct = total = 0
    for ref, hyp in zip(references, hypotheses):
        correct += max(0, len(ref) - Levenshtein.distance(ref, hyp))
        total += len(ref)
    return Metric(float(correct), float(total), TOKENS)


def unpad(tokens: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [row[:length].tolist() for row, length in zip(tokens, lengths.tolist())]
