"""Frontends: a padded batch in, features out.

A frontend owns the model's view of its input. It reports:
- `input_spec`: what the data pipeline must produce for it (fbank with these
  options, or raw waveform) at which sample rate; the data pipeline reads it from
  here, so feature settings are written once, in the model config;
- `output_dim`: the feature width the encoder is built with (never typed in a config);
- `frame_shift`: seconds per output frame.

The fbank frontend takes the batch's precomputed fbank (computed in data-loading
workers with kaldi-native-fbank) and applies global CMVN from `echoic prepare`'s
statistics, held as buffers so they travel inside the model's weights. The SSL
frontend (`echoic.models.ssl`: a HuggingFace wav2vec2-style model, waveform in)
implements the same interface:

- `forward(batch) -> (features (B, T, output_dim), lengths (B,))`;
- `num_frames(num_samples)` and `seconds_for_frames(frames)`: its frames for an
  utterance's samples, and the shortest audio giving `frames` of them;
- `inputs_from_samples(samples)`: what a batch carries for one utterance (its fbank, or
  the samples themselves), for decoding audio that does not come from a manifest;
- `start_step(step)`: called by the trainer before each optimizer step, for frontends
  whose training changes with the step (an upstream unfrozen after N steps);
- `output_source`: where `output_dim` came from, for errors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from echoic.config import one_of
from echoic.data.batch import Batch
from echoic.data.features import CmvnStats, FbankConfig, InputSpec, compute_fbank
from echoic.errors import EchoicError
from echoic.models.ssl import SslFrontend, SslFrontendConfig


@dataclass(frozen=True)
class FbankFrontendConfig:
    sample_rate: int = 16000  # audio is resampled to this rate before features
    fbank: FbankConfig = FbankConfig()  # kaldi-compatible log-mel filterbank options
    global_cmvn: bool = True  # normalise with the statistics of `echoic prepare`


@dataclass(frozen=True)
class FrontendConfig:
    """Exactly one kind of frontend; fbank when none is given."""

    fbank: FbankFrontendConfig | None = None
    ssl: SslFrontendConfig | None = None  # a self-supervised model from a local folder

    def __post_init__(self) -> None:
        one_of(self, ["fbank", "ssl"], default={"fbank": FbankFrontendConfig()})


class FbankFrontend(nn.Module):
    def __init__(self, config: FbankFrontendConfig) -> None:
        super().__init__()
        self.config = config
        self.output_dim = config.fbank.num_mel_bins
        self.frame_shift = config.fbank.frame_shift_ms / 1000.0
        self.input_spec = InputSpec("fbank", config.sample_rate, config.fbank)
        self.output_source = "model.frontend.fbank.fbank.num_mel_bins"
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

    def num_frames(self, num_samples: int) -> int:
        return self.config.fbank.num_frames(num_samples, self.config.sample_rate)

    def seconds_for_frames(self, frames: int) -> float:
        return self.input_spec.seconds_for_frames(frames)

    def inputs_from_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """Fbank of one utterance's samples, without dither (as for evaluation)."""
        fbank = replace(self.config.fbank, dither=0.0)
        return torch.from_numpy(compute_fbank(samples.numpy(), self.config.sample_rate, fbank))

    def start_step(self, step: int) -> None:
        """Nothing changes with the step here."""

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> features (B, T, F) with padding zeroed, lengths (B,)."""
        if batch.feats is None:
            raise EchoicError("the fbank frontend needs a batch with fbank features")
        return self.normalize(batch.feats, batch.feat_lens), batch.feat_lens

    def export_features(
        self, feats: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The exported graph's frontend: fbank in, normalised (CMVN inside the graph)."""
        return self.normalize(feats, lengths), lengths

    def normalize(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Global CMVN on (B, T, F) fbank, padding kept at zero."""
        if not self.config.global_cmvn:
            return feats
        frames = torch.arange(feats.shape[1], device=feats.device)
        valid = frames[None, :, None] < lengths[:, None, None]
        return ((feats - self.cmvn_mean) * self.cmvn_istd) * valid


Frontend = FbankFrontend | SslFrontend


def build_frontend(config: FrontendConfig) -> Frontend:
    if config.ssl is not None:
        return SslFrontend(config.ssl)
    return FbankFrontend(config.fbank)
