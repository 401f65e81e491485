"""CTC head: a linear map to the vocabulary, torch's CTC loss, greedy accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from echoic.models.contract import UTTERANCES, Unit, metric
from echoic.models.heads import HeadOutput, token_accuracy, unpad

NO_CTC_ALIGNMENT = "no_ctc_alignment"  # the skip reason for an utterance CTC cannot align


@dataclass(frozen=True)
class CtcConfig:
    weight: float = 0.3  # share of the total loss


class CtcHead(nn.Module):
    metrics: ClassVar[dict[str, Unit]] = {"loss_ctc": UTTERANCES}

    def __init__(
        self, input_dim: int, vocab_size: int, config: CtcConfig, blank_id: int = 0
    ) -> None:
        super().__init__()
        self.weight = config.weight
        self.blank_id = blank_id
        self.proj = nn.Linear(input_dim, vocab_size)

    def log_probs(self, encoded: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, V) log-probabilities."""
        return F.log_softmax(self.proj(encoded).float(), dim=-1)

    @staticmethod
    def frames_needed(tokens: torch.Tensor, token_lens: torch.Tensor) -> torch.Tensor:
        """(B, U) tokens padded with -1, (B,) lengths -> (B,) the fewest encoder frames
        that can emit them: one per token, plus a blank between each two equal
        neighbours (CTC merges repeats that no blank separates)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        inside = positions[1:] < token_lens[:, None]  # pairs (u-1, u) within the length
        repeats = ((tokens[:, 1:] == tokens[:, :-1]) & inside).sum(dim=1)
        return token_lens + repeats

    def token_indexed(self) -> list[str]:
        """Parameters whose first dimension is indexed by token id (rows moved, not
        reloaded, when fine-tuning with another vocabulary)."""
        return ["proj.weight", "proj.bias"]

    def greedy(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """Best path: argmax per frame, repeats merged, blanks removed."""
        return best_path(log_probs, lengths, self.blank_id)

    def forward(
        self, encoded, encoded_lens, tokens, token_lens, *, with_accuracy: bool = False
    ) -> HeadOutput:
        log_probs = self.log_probs(encoded)
        # The model leaves out the utterances CTC cannot align (see frames_needed) before
        # the heads run. zero_infinity only keeps finite the forward of a batch where
        # every utterance was left out, whose loss the model multiplies by zero.
        loss = F.ctc_loss(
            log_probs.transpose(0, 1),
            tokens.clamp(min=0),
            encoded_lens,
            token_lens,
            blank=self.blank_id,
            reduction="sum",
            zero_infinity=True,
        )
        batch = encoded.shape[0]
        accuracy = None
        if with_accuracy:
            accuracy = token_accuracy(
                unpad(tokens, token_lens), self.greedy(log_probs.detach(), encoded_lens)
            )
        return HeadOutput(loss, {"loss_ctc": metric(loss.detach(), batch, UTTERANCES)}, accuracy)


def best_path(log_probs: torch.Tensor, lengths: torch.Tensor, blank_id: int) -> list[list[int]]:
    """(B, T, V) log-probabilities, (B,) lengths -> each utterance's best path: argmax
    per frame, repeats merged, blanks removed."""
    hypotheses = []
    for best, length in zip(log_probs.argmax(-1), lengths.tolist()):
        merged = torch.unique_consecutive(best[:length])
        hypotheses.append(merged[merged != blank_id].tolist())
    return hypotheses
