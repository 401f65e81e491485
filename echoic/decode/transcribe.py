"""`echoic transcribe`: text for audio files, for a user who just wants the words.

Any file soundfile reads, at any sample rate and channel count: channels are mixed
and the audio resampled (soxr) to what the model was trained on.

A recording is rarely one sentence, and a model trained on sentences runs words
together across the pauses of a long one. So a file that is longer than
`SegmentOptions.max_segment`, or in which the voice-activity detector hears more than
one stretch of speech, is cut at its pauses (`echoic.decode.segment`); the segments are
decoded in batches and their texts joined in time order. A file of one utterance is
decoded whole, exactly as without segmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from echoic.data.audio import load_audio
from echoic.data.batch import Batch
from echoic.data.text import drop_spaces_between_cjk
from echoic.decode.decoder import (
    DecodeOptions,
    ScorerSettings,
    check_options,
    decode_batch,
    default_method,
    with_scorer,
)
from echoic.decode.segment import SegmentOptions, SileroVad, find_segments
from echoic.errors import AudioError, EchoicError
from echoic.models.base import EncoderModel
from echoic.train.experiment import load_experiment_model

# Padded fbank frames per batch of segments, 200 s of audio: `echoic decode`'s default
# --max-frames, so a long file needs no more memory than decoding a manifest does.
MAX_BATCH_FRAMES = 20000
DEFAULT_SEGMENTATION = SegmentOptions()

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimedText:
    start: float  # seconds from the start of the file
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    path: str
    text: str  # the segments' texts joined in time order
    segments: list[TimedText]  # what was decoded: one (0, duration) when the file was whole


def transcribe(
    exp_dir: str | Path,
    audio_paths: list[str],
    *,
    method: str | None = None,
    options: DecodeOptions | None = None,
    scorer: ScorerSettings | None = None,
    checkpoint: str | None = None,
    segmentation: SegmentOptions | None = DEFAULT_SEGMENTATION,
) -> Iterator[Transcript]:
    """A `Transcript` for each file, in order (see `Transcriber`)."""
    transcriber = Transcriber(
        exp_dir,
        method=method,
        options=options,
        scorer=scorer,
        checkpoint=checkpoint,
        segmentation=segmentation,
    )
    for path in audio_paths:
        yield transcriber(path)


class Transcriber:
    """A loaded model that turns audio files into `Transcript`s.

    `options` are the search settings of `echoic decode` (beam, rescoring weights...);
    their method is replaced by `method`, or by the best the model has when that is
    None. `scorer` names the hotwords and word LM the search adds. `segmentation`
    None decodes every file whole, however long."""

    def __init__(
        self,
        exp_dir: str | Path,
        *,
        method: str | None = None,
        options: DecodeOptions | None = None,
        scorer: ScorerSettings | None = None,
        checkpoint: str | None = None,
        segmentation: SegmentOptions | None = DEFAULT_SEGMENTATION,
    ) -> None:
        self.model, self.tokenizer, _ = load_experiment_model(exp_dir, checkpoint=checkpoint)
        self.options = with_scorer(
            replace(
                options or DecodeOptions(method=""), method=method or default_method(self.model)
            ),
            scorer,
            self.tokenizer,
        )
        check_options(self.model, self.options)
        self.segmentation = segmentation
        self.vad = SileroVad() if segmentation is not None else None

    def __call__(self, path: str) -> Transcript:
        """The transcript of one file. An unreadable file is a one-line error."""
        model, tokenizer, options = self.model, self.tokenizer, self.options
        rate = model.input_spec.sample_rate
        try:
            samples = load_audio(path, sample_rate=rate)
        except AudioError as error:
            raise EchoicError(str(error)) from None
        duration = samples.shape[0] / rate
        spans = None
        if self.vad is not None:
            probs = self.vad.probabilities(samples, rate)
            found = find_segments(probs, duration, self.segmentation)
            if len(found) > 1 or duration > self.segmentation.max_segment:
                spans = [(s.start, s.end) for s in found]
                if not spans:
                    log.warning("%s: no speech found in %.1f s of audio", path, duration)
        if spans is None:
            # min_input_frames gives one encoder frame, which is enough to decode.
            if model.frontend.num_frames(samples.shape[0]) < model.encoder.min_input_frames:
                raise EchoicError(f"{path}: {duration:.2f} s is too short to transcribe")
            inputs = _inputs(model, samples)
            (best,) = decode_batch(
                model, inputs_batch(model, [str(path)], [inputs], [duration]), options
            )
            text = tokenizer.decode(best.tokens)
            return Transcript(str(path), text, [TimedText(0.0, duration, text)])
        tokens = _decode_spans(model, samples, spans, options, str(path))
        segments = [
            TimedText(start, end, tokenizer.decode(best))
            for (start, end), best in zip(spans, tokens)
            if best is not None
        ]
        text = drop_spaces_between_cjk(" ".join(s.text for s in segments if s.text))
        return Transcript(str(path), text, segments)


def _inputs(model: EncoderModel, samples: np.ndarray) -> torch.Tensor:
    """What a batch carries for these samples: fbank, or the waveform itself."""
    return model.frontend.inputs_from_samples(torch.from_numpy(samples))


def inputs_batch(
    model: EncoderModel, ids: list[str], inputs: list[torch.Tensor], durations: list[float]
) -> Batch:
    """A padded batch of utterances' frontend inputs (`model.frontend.inputs_from_samples`),
    for decoding audio that does not come from a manifest."""
    padded = pad_sequence(inputs, batch_first=True)
    lengths = torch.tensor([f.shape[0] for f in inputs])
    waveform = model.input_spec.kind == "waveform"
    return Batch(
        epoch=0,
        index=0,
        ids=ids,
        texts=[""] * len(ids),
        durations=durations,
        tokens=None,
        token_lens=None,
        feats=None if waveform else padded,
        feat_lens=None if waveform else lengths,
        audio=padded if waveform else None,
        audio_lens=lengths if waveform else None,
    )


def _decode_spans(
    model: EncoderModel,
    samples: np.ndarray,
    spans: list[tuple[float, float]],
    options: DecodeOptions,
    path: str,
) -> list[tuple[int, ...] | None]:
    """Best tokens for each (start, end) span of `samples`, in the order given; None
    for a span too short for the encoder (logged). Spans are batched by length, up to
    MAX_BATCH_FRAMES padded frames, so padding stays small."""
    rate = model.input_spec.sample_rate
    # Each span's inputs from its own samples, as if it had been its own file.
    pieces = [samples[round(s * rate) : round(e * rate)] for s, e in spans]
    feats = [_inputs(model, piece) for piece in pieces]
    frames = [model.frontend.num_frames(piece.shape[0]) for piece in pieces]
    results: list[tuple[int, ...] | None] = [None] * len(spans)
    usable = [i for i, f in enumerate(frames) if f >= model.encoder.min_input_frames]
    if len(usable) < len(spans):
        log.warning(
            "%s: %d segments too short for the encoder were skipped",
            path,
            len(spans) - len(usable),
        )
    usable.sort(key=lambda i: frames[i])
    batch: list[int] = []
    for k, i in enumerate(usable):
        batch.append(i)
        # Sorted by length: the next span is the longest, so it sets the padded size.
        following = usable[k + 1] if k + 1 < len(usable) else None
        if following is None or (len(batch) + 1) * frames[following] > MAX_BATCH_FRAMES:
            ids = [f"{path}@{spans[j][0]:.2f}" for j in batch]
            durations = [spans[j][1] - spans[j][0] for j in batch]
            inputs = inputs_batch(model, ids, [feats[j] for j in batch], durations)
            best = decode_batch(model, inputs, options)
            for j, hypothesis in zip(batch, best):
                results[j] = hypothesis.tokens
            batch = []
    return results
