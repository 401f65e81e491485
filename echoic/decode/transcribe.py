"""`echoic transcribe`: text for audio files, for a user who just wants the words.

Any file soundfile reads, at any sample rate and channel count: channels are mixed
and the audio resampled (soxr) to what the model was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from echoic.data.audio import load_audio
from echoic.data.dataset import Batch
from echoic.data.features import compute_fbank
from echoic.decode.decoder import (
    DecodeOptions,
    ScorerSettings,
    check_options,
    decode_batch,
    default_method,
    load_experiment_model,
)
from echoic.errors import AudioError, EchoicError


def transcribe(
    exp_dir: str | Path,
    audio_paths: list[str],
    *,
    method: str | None = None,
    options: DecodeOptions | None = None,
    scorer: ScorerSettings | None = None,
    checkpoint: str | None = None,
) -> Iterator[tuple[str, str]]:
    """(path, text) for each file, in order. An unreadable file is a one-line error.

    `options` are the search settings of `echoic decode` (beam, rescoring weights...);
    their method is replaced by `method`, or by the best the model has when that is
    None. `scorer` names the hotwords and word LM the search adds."""
    model, tokenizer, _ = load_experiment_model(exp_dir, checkpoint=checkpoint)
    options = replace(
        options or DecodeOptions(method=""),
        method=method or default_method(model),
        context=(scorer or ScorerSettings()).build(tokenizer),
    )
    check_options(model, options)
    spec = model.input_spec
    if spec.kind != "fbank":
        raise EchoicError("transcribe supports fbank models")
    for path in audio_paths:
        try:
            samples = load_audio(path, sample_rate=spec.sample_rate)
        except AudioError as error:
            raise EchoicError(str(error)) from None
        feats = torch.from_numpy(
            compute_fbank(samples, spec.sample_rate, replace(spec.fbank, dither=0.0))
        )
        # min_input_frames gives one encoder frame, which is enough to decode.
        if feats.shape[0] < model.encoder.min_input_frames:
            raise EchoicError(
                f"{path}: {samples.shape[0] / spec.sample_rate:.2f} s is too short to transcribe"
            )
        batch = Batch(
            epoch=0,
            index=0,
            ids=[str(path)],
            texts=[""],
            durations=[samples.shape[0] / spec.sample_rate],
            tokens=None,
            token_lens=None,
            feats=feats[None],
            feat_lens=torch.tensor([feats.shape[0]]),
            audio=None,
            audio_lens=None,
        )
        (best,) = decode_batch(model, batch, options)
        yield path, tokenizer.decode(best.tokens)
