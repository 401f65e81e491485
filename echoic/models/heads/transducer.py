"""Transducer head: a predictor over previous tokens (stateless or LSTM), a joiner, and
echoic's own RNN-T loss. Blank (id 0) also starts the predictor's history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from echoic.config import one_of
from echoic.models.contract import UTTERANCES, Unit, metric
from echoic.models.heads import HeadOutput, token_accuracy, unpad
from echoic.models.rnnt_loss import rnnt_loss


@dataclass(frozen=True)
class StatelessPredictorConfig:
    embed_dim: int = 256
    context: int = 2  # tokens of history: the current one and context - 1 before it


@dataclass(frozen=True)
class LstmPredictorConfig:
    embed_dim: int = 256
    hidden_dim: int = 320
    num_layers: int = 1
    dropout: float = 0.1


@dataclass(frozen=True)
class PredictorConfig:
    """Exactly one kind; stateless when none is given."""

    stateless: StatelessPredictorConfig | None = None
    lstm: LstmPredictorConfig | None = None

    def __post_init__(self) -> None:
        one_of(self, ["stateless", "lstm"], default={"stateless": StatelessPredictorConfig()})


@dataclass(frozen=True)
class TransducerConfig:
    weight: float = 1.0  # share of the total loss
    predictor: PredictorConfig = PredictorConfig()
    joiner_dim: int = 256
    fused_log_softmax: bool = True  # False: a full log-softmax tensor first (more memory)


class StatelessPredictor(nn.Module):
    """Embedding, then a causal depthwise convolution over the last `context` tokens.

    forward: (B, U) tokens -> (B, U, E); step: (B,) tokens with the (B, context-1)
    history before them -> output (B, E) and the new history."""

    def __init__(self, vocab_size: int, config: StatelessPredictorConfig, blank_id: int) -> None:
        super().__init__()
        self.context = config.context
        self.output_dim = config.embed_dim
        self.blank_id = blank_id
        # Blank embeds to zero: the same vector as the padding before the first token in
        # training, so a search that starts from a history of blanks sees what training saw.
        self.embed = nn.Embedding(vocab_size, config.embed_dim, padding_idx=blank_id)
        self.conv = None
        if config.context > 1:
            self.conv = nn.Conv1d(
                config.embed_dim,
                config.embed_dim,
                config.context,
                groups=config.embed_dim,
                bias=False,
            )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.conv is not None:
            x = self.conv(F.pad(x.transpose(1, 2), (self.context - 1, 0))).transpose(1, 2)
        return torch.relu(x)

    def initial_state(self, batch: int, device) -> torch.Tensor:
        return torch.full((batch, self.context - 1), self.blank_id, dtype=torch.long, device=device)

    def step(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.cat([state, tokens[:, None]], dim=1)  # (B, context)
        return self.forward(window)[:, -1], window[:, 1:]


class LstmPredictor(nn.Module):
    def __init__(self, vocab_size: int, config: LstmPredictorConfig, blank_id: int) -> None:
        super().__init__()
        self.output_dim = config.hidden_dim
        self.num_layers = config.num_layers
        self.embed = nn.Embedding(vocab_size, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(
            config.embed_dim, config.hidden_dim, config.num_layers, batch_first=True
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lstm(self.dropout(self.embed(tokens)))[0]

    def initial_state(self, batch: int, device):
        zeros = torch.zeros(self.num_layers, batch, self.output_dim, device=device)
        return zeros, zeros.clone()

    def step(self, tokens: torch.Tensor, state):
        out, state = self.lstm(self.embed(tokens)[:, None], state)
        return out[:, 0], state


class Joiner(nn.Module):
    """logits[b, t, u] = out(tanh(enc_proj(enc[b, t]) + pred_proj(pred[b, u])))."""

    def __init__(
        self, encoder_dim: int, predictor_dim: int, joiner_dim: int, vocab_size: int
    ) -> None:
        super().__init__()
        self.enc_proj = nn.Linear(encoder_dim, joiner_dim)
        self.pred_proj = nn.Linear(predictor_dim, joiner_dim)
        self.out = nn.Linear(joiner_dim, vocab_size)

    def forward(self, encoded: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """(B, T, D), (B, U+1, P) -> (B, T, U+1, V); or (B, D), (B, P) -> (B, V)."""
        if encoded.dim() == 2:
            return self.out(torch.tanh(self.enc_proj(encoded) + self.pred_proj(predicted)))
        hidden = self.enc_proj(encoded)[:, :, None, :] + self.pred_proj(predicted)[:, None, :, :]
        return self.out(torch.tanh_(hidden))


class TransducerHead(nn.Module):
    metrics: ClassVar[dict[str, Unit]] = {"loss_rnnt": UTTERANCES}

    def __init__(
        self, input_dim: int, vocab_size: int, config: TransducerConfig, blank_id: int = 0
    ) -> None:
        super().__init__()
        self.weight = config.weight
        self.blank_id = blank_id
        self.fused_log_softmax = config.fused_log_softmax
        kind = config.predictor
        if kind.lstm is not None:
            self.predictor: nn.Module = LstmPredictor(vocab_size, kind.lstm, blank_id)
        else:
            self.predictor = StatelessPredictor(vocab_size, kind.stateless, blank_id)
        self.joiner = Joiner(input_dim, self.predictor.output_dim, config.joiner_dim, vocab_size)

    def token_indexed(self) -> list[str]:
        """Parameters whose first dimension is indexed by token id (rows moved, not
        reloaded, when fine-tuning with another vocabulary)."""
        return ["predictor.embed.weight", "joiner.out.weight", "joiner.out.bias"]

    def forward(
        self, encoded, encoded_lens, tokens, token_lens, *, with_accuracy: bool = False
    ) -> HeadOutput:
        history = torch.cat(
            [tokens.new_full((tokens.shape[0], 1), self.blank_id), tokens.clamp(min=0)], dim=1
        )
        logits = self.joiner(encoded, self.predictor(history))
        if not self.fused_log_softmax:
            logits = logits.log_softmax(-1)
        loss = rnnt_loss(
            logits,
            tokens,
            encoded_lens,
            token_lens,
            blank=self.blank_id,
            reduction="sum",
            fused_log_softmax=self.fused_log_softmax,
        )
        accuracy = None
        if with_accuracy:
            with torch.no_grad():
                accuracy = token_accuracy(
                    unpad(tokens, token_lens), self.greedy(encoded, encoded_lens)
                )
        batch = encoded.shape[0]
        return HeadOutput(loss, {"loss_rnnt": metric(loss.detach(), batch, UTTERANCES)}, accuracy)

    def greedy(
        self, encoded: torch.Tensor, lengths: torch.Tensor, max_symbols: int = 3
    ) -> list[list[int]]:
        """Batched greedy search, at most `max_symbols` tokens per frame."""
        batch, frames, _ = encoded.shape
        device = encoded.device
        state = self.predictor.initial_state(batch, device)
        last = torch.full((batch,), self.blank_id, dtype=torch.long, device=device)
        predicted, state = self.predictor.step(last, state)
        hypotheses: list[list[int]] = [[] for _ in range(batch)]
        for t in range(frames):
            active = t < lengths
            for _ in range(max_symbols):
                best = self.joiner(encoded[:, t], predicted).argmax(-1)
                emit = active & (best != self.blank_id)
                if not bool(emit.any()):
                    break
                for row in emit.nonzero()[:, 0].tolist():
                    hypotheses[row].append(int(best[row]))
                new_predicted, new_state = self.predictor.step(best, state)
                predicted = torch.where(emit[:, None], new_predicted, predicted)
                state = _select_state(emit, new_state, state)
                active = emit
        return hypotheses


def _select_state(emit: torch.Tensor, new, old):
    """Per utterance, the new predictor state where it emitted, the old one elsewhere."""
    if isinstance(new, tuple):  # LSTM (h, c): (layers, B, H)
        return tuple(torch.where(emit[None, :, None], n, o) for n, o in zip(new, old))
    return torch.where(emit[:, None], new, old)
