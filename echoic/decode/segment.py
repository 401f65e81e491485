"""Voice-activity segmentation: where the speech is in a long recording.

A model trained on single sentences runs words together when it hears many sentences
in one piece (and attention over minutes of audio needs memory quadratic in its
length), so `echoic transcribe` cuts long recordings at their pauses and decodes the
pieces. Speech probabilities come from Silero VAD's packaged "sequence" ONNX model
(pip package silero-vad >= 6.2.2), run in onnxruntime: no torchaudio, no download.
Frames are 32 ms; turning their probabilities into segments is `find_segments`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from echoic.errors import EchoicError

VAD_SAMPLE_RATE = 16000  # the packaged sequence model is 16 kHz only
FRAME_SAMPLES = 512  # one probability per 32 ms frame
CONTEXT_SAMPLES = 64  # each frame is preceded by the last samples of the frame before
FRAME_SECONDS = FRAME_SAMPLES / VAD_SAMPLE_RATE
BLOCK_FRAMES = 512  # frames per ONNX call (16.4 s): the LSTM state carries across calls
LSTM_STATE_SHAPE = (1, 1, 128)
VAD_PACKAGE = "silero_vad"
VAD_MODEL = "data/silero_vad_16k_sequence.onnx"  # inside the package; added in 6.2.2
VAD_REQUIREMENT = "silero-vad>=6.2.2"


@dataclass(frozen=True)
class SegmentOptions:
    """How speech probabilities become segments. Seconds throughout."""

    threshold: float = 0.5  # a frame at least this likely to be speech starts a region
    end_threshold: float = 0.35  # frames below this count as silence (hysteresis: a dip
    # between the two thresholds neither starts nor ends a region)
    min_silence: float = 0.3  # silence this long ends a region; shorter pauses stay inside
    min_speech: float = 0.2  # shorter regions are dropped: clicks and breaths, not words
    max_segment: float = 20.0  # longer regions are cut at their least speech-like frame
    pad: float = 0.2  # audio kept either side of a region, never past the middle of a pause

    def __post_init__(self) -> None:
        if not 0.0 < self.end_threshold <= self.threshold < 1.0:
            raise EchoicError("segmentation needs 0 < end_threshold <= threshold < 1")
        if self.max_segment - 2 * self.pad < 4 * FRAME_SECONDS:
            raise EchoicError(
                f"--max-segment {self.max_segment} s is too short: at least "
                f"{2 * self.pad + 4 * FRAME_SECONDS:.2f} s"
            )
        if min(self.min_silence, self.min_speech, self.pad) < 0.0:
            raise EchoicError("segmentation durations must not be negative")


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the file
    end: float


def vad_model_path() -> Path:
    """The packaged ONNX model, found without importing silero_vad: importing it runs
    `torch.set_num_threads(1)`, which would slow every later decode in the process."""
    spec = importlib.util.find_spec(VAD_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EchoicError(f"segmenting long audio needs {VAD_REQUIREMENT}: pip install it")
    path = Path(next(iter(spec.submodule_search_locations))) / VAD_MODEL
    if not path.is_file():
        raise EchoicError(f"{path} is missing: segmenting long audio needs {VAD_REQUIREMENT}")
    return path


class SileroVad:
    """Per-frame speech probabilities from Silero VAD's sequence model, which runs a
    block of frames per call (bit-identical to its frame-by-frame streaming model)."""

    def __init__(self, *, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # The LSTM runs frame after frame: more threads barely help a model this small.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(vad_model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def probabilities(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """(ceil(S / 512),) float32 speech probabilities, one per 32 ms frame, for
        (S,) float32 mono samples at 16 kHz (other rates are resampled first, so S counts
        16 kHz samples)."""
        if sample_rate != VAD_SAMPLE_RATE:
            samples = soxr.resample(samples, sample_rate, VAD_SAMPLE_RATE).astype(np.float32)
        num_frames = -(-samples.shape[0] // FRAME_SAMPLES)
        frames = np.zeros((num_frames, FRAME_SAMPLES), dtype=np.float32)
        frames.reshape(-1)[: samples.shape[0]] = samples
        context = np.zeros((num_frames, CONTEXT_SAMPLES), dtype=np.float32)
        context[1:] = frames[:-1, -CONTEXT_SAMPLES:]
        hidden = np.zeros(LSTM_STATE_SHAPE, dtype=np.float32)
        cell = np.zeros(LSTM_STATE_SHAPE, dtype=np.float32)
        probs = []
        for first in range(0, num_frames, BLOCK_FRAMES):
            block = np.concatenate(
                [context[first : first + BLOCK_FRAMES], frames[first : first + BLOCK_FRAMES]],
                axis=1,
            )
            values, hidden, cell = self.session.run(None, {"input": block, "h": hidden, "c": cell})
            probs.append(values.reshape(-1))
        return np.concatenate(probs) if probs else np.zeros(0, dtype=np.float32)


def speech_regions(probs: np.ndarray, options: SegmentOptions) -> list[tuple[int, int]]:
    """[start, end) frame ranges of speech in (N,) per-frame probabilities: a region
    starts at a frame >= threshold and ends where `min_silence` of frames below
    end_threshold begins; regions shorter than `min_speech` are dropped."""
    min_silence = max(1, round(options.min_silence / FRAME_SECONDS))
    min_speech = round(options.min_speech / FRAME_SECONDS)
    regions = []
    start = silent_from = None
    for i, p in enumerate(probs.tolist()):
        if start is None:
            if p >= options.threshold:
                start, silent_from = i, None
        elif p >= options.end_threshold:
            silent_from = None
        elif silent_from is None:
            silent_from = i
        if silent_from is not None and i + 1 - silent_from >= min_silence:
            regions.append((start, silent_from))
            start = silent_from = None
    if start is not None:
        regions.append((start, silent_from if silent_from is not None else len(probs)))
    return [(s, e) for s, e in regions if e - s >= max(1, min_speech)]


def split_long(start: int, end: int, probs: np.ndarray, max_frames: int) -> list[tuple[int, int]]:
    """[start, end) cut into pieces of at most `max_frames`, each cut at the least
    speech-like frame of the second half of the window it closes, so no piece but the
    last is shorter than half the cap."""
    pieces = []
    while end - start > max_frames:
        low, high = start + max_frames // 2, start + max_frames
        # The latest of equal minima: speech probabilities often sit at exactly 1.0, and
        # cutting late keeps the pieces few and long.
        cut = high - 1 - int(np.argmin(probs[low:high][::-1]))
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def find_segments(probs: np.ndarray, duration: float, options: SegmentOptions) -> list[Segment]:
    """Segments, in time order, of a `duration`-second file from its (N,) per-frame
    speech probabilities: speech regions, long ones cut (`split_long`), each padded
    by up to `pad` on the sides that face silence. A segment is at most `max_segment`
    long and segments never overlap."""
    max_frames = int((options.max_segment - 2 * options.pad) / FRAME_SECONDS)
    pieces: list[tuple[float, float, bool, bool]] = []  # start, end, pad left, pad right
    for start, end in speech_regions(probs, options):
        cut = split_long(start, end, probs, max_frames)
        for k, (s, e) in enumerate(cut):
            # Only a region's outer edges face silence; its inner cuts get no padding,
            # or the audio around a cut would be heard (and transcribed) twice.
            first, last = k == 0, k == len(cut) - 1
            pieces.append((s * FRAME_SECONDS, min(e * FRAME_SECONDS, duration), first, last))
    segments = []
    for k, (start, end, pad_left, pad_right) in enumerate(pieces):
        before = start - (pieces[k - 1][1] if k else 0.0)
        after = (pieces[k + 1][0] if k + 1 < len(pieces) else duration) - end
        # Half the pause to a neighbour, all of it to the file's edge.
        left = min(options.pad, before / 2 if k else before) if pad_left else 0.0
        right = min(options.pad, after / 2 if k + 1 < len(pieces) else after) if pad_right else 0.0
        segments.append(Segment(start - left, end + right))
    return segments
