"""A padded batch, what every model's forward takes, and the skips that went with it.

Small on purpose: models import `Batch` from here, not from the data pipeline that
makes it (echoic.data.dataset).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

IGNORE_ID = -1  # padding value of `Batch.tokens`, bias targets and decoder targets

# Batch's tensor fields: what moves to pinned memory and to the device.
BATCH_TENSORS = (
    "tokens",
    "token_lens",
    "feats",
    "feat_lens",
    "audio",
    "audio_lens",
    "hotwords",
    "hotword_lens",
    "bias_targets",
)


@dataclass(frozen=True)
class Skip:
    utt_id: str
    reason: str  # short category, e.g. "empty_text", "truncated_audio"
    message: str
    where: str  # manifest "path:line"


@dataclass
class Batch:
    """A padded batch. B utterances, T frames, F bins, S samples, U tokens."""

    epoch: int
    index: int  # global batch index within the epoch (see BucketBatchSampler)
    ids: list[str]
    texts: list[str]
    durations: list[float]  # seconds of audio after speed perturbation
    tokens: torch.Tensor | None  # (B, U) int64, padded with IGNORE_ID; None without tokenizer
    token_lens: torch.Tensor | None  # (B,)
    feats: torch.Tensor | None  # (B, T, F) float32, zero padded; None for waveform input
    feat_lens: torch.Tensor | None  # (B,)
    audio: torch.Tensor | None  # (B, S) float32, zero padded; None for fbank input
    audio_lens: torch.Tensor | None  # (B,)
    skipped: list[Skip] = field(default_factory=list)
    unknown_chars: Counter[str] = field(default_factory=Counter)
    # Waveform augmentation that could not be applied (a noise file that failed to read):
    # (reason, message) each; the utterance stays in the batch without it.
    augment_failures: list[tuple[str, str]] = field(default_factory=list)
    # Waveform batches count frames of 10 ms (as `max_frames` does): samples per frame.
    samples_per_frame: int = 1
    # The seed the batch's augmentation drew from: a model that draws per-utterance
    # choices of its own (Paraformer's glancing) draws them from (seed, epoch, id) too.
    seed: int = 0
    # With data.hotwords: the batch's training hotwords (K, L), their lengths (K,) and
    # each utterance's bias targets (B, U) (see echoic.data.hotwords).
    hotwords: torch.Tensor | None = None
    hotword_lens: torch.Tensor | None = None
    bias_targets: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def input_lens(self) -> torch.Tensor:
        return self.feat_lens if self.feat_lens is not None else self.audio_lens

    @property
    def real_frames(self) -> int:
        return int(self.input_lens.sum()) // self.samples_per_frame if self.size else 0

    @property
    def padded_frames(self) -> int:
        return int(self.input_lens.max()) * self.size // self.samples_per_frame if self.size else 0

    def pin_memory(self) -> Batch:
        for name in BATCH_TENSORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.pin_memory())
        return self
