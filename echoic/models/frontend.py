"""Frontends: a padded batch in, features out.

A frontend owns the model's view of its input. It reports:
- `input_spec`: what the data pipeline must produce for it (fbank with these
  options, or raw waveform) at which sample rate; the data pipeline reads it from
  here, so feature settings are written once, in the model config;
- `output_dim`: the feature width the encoder is built with (never typed in a config);
- `frame_shift`: seconds per output frame.

The fbank frontend takes the batch's precomputed fbank (computed in data-loading
workers with kaldi-native-fbank) and applies global CMVN from `echoic prepare`'s
statistics, held as buffers so they travel inside the model's weights. Frontends
over self-supervised models (waveform in) follow the same interface later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from echoic.config import one_of
from echoic.data.dataset import Batch
from echoic.data.features import CmvnStats, FbankConfig, InputSpec
from echoic.errors import EchoicError


@dataclass(frozen=True)
class FbankFrontendConfig:
    sample_rate: int = 16000  # audio is resampled to this rate before features
    fbank: FbankConfig = FbankConfig()  # kaldi-compatible log-mel filterbank options
    global_cmvn: bool = True  # normalise with the statistics of `echoic prepare`


@dataclass(frozen=True)
class FrontendConfig:
    """Exactly one kind of frontend; fbank when none is given."""

    fbank: FbankFrontendConfig | None = None

    def __post_init__(self) -> None:
        one_of(self, ["fbank"], default={"fbank": FbankFrontendConfig()})


class FbankFrontend(nn.Module):
    def __init__(self, config: FbankFrontendConfig) -> None:
        super().__init__()
        self.config = config
        self.output_dim = config.fbank.num_mel_bins
        self.frame_shift = config.fbank.frame_shift_ms / 1000.0
        self.input_spec = InputSpec("fbank", config.sample_rate, config.fbank)
        # Identity until set_cmvn() or load_state_dict() fills them.
        self.register_buffer("cmvn_mean", torch.zeros(self.output_dim))
        self.register_buffer("cmvn_istd", torch.ones(self.output_dim))

    def set_cmvn(self, stats: CmvnStats) -> None:
        """Use `stats` (from `echoic prepare`), after checking they match these features."""
        if stats.fbank.num_mel_bins != self.config.fbank.num_mel_bins:
            raise EchoicError(
                f"CMVN statistics have {stats.fbank.num_mel_bins} mel bins, the frontend "
                f"{self.config.fbank.num_mel_bins}: rerun echoic prepare with --num-mel-bins"
            )
        if (
            stats.sample_rate != self.config.sample_rate
            or stats.fbank.frame_shift_ms != self.config.fbank.frame_shift_ms
        ):
            raise EchoicError("CMVN statistics were computed at another sample rate or frame shift")
        self.cmvn_mean.copy_(torch.from_numpy(stats.mean))
        self.cmvn_istd.copy_(torch.from_numpy(1.0 / stats.std))

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> features (B, T, F) with padding zeroed, lengths (B,)."""
        if batch.feats is None:
            raise EchoicError("the fbank frontend needs a batch with fbank features")
        return self.normalize(batch.feats, batch.feat_lens), batch.feat_lens

    def normalize(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Global CMVN on (B, T, F) fbank, padding kept at zero."""
        if not self.config.global_cmvn:
            return feats
        frames = torch.arange(feats.shape[1], device=feats.device)
        valid = frames[None, :, None] < lengths[:, None, None]
        return ((feats - self.cmvn_mean) * self.cmvn_istd) * valid


Frontend = FbankFrontend  # the interface every frontend implements; more kinds come later


def build_frontend(config: FrontendConfig) -> Frontend:
    return FbankFrontend(config.fbank)
