"""Long recordings: voice-activity segmentation and `echoic transcribe` on many utterances
in one file (their texts against decoding each utterance alone)."""

import itertools
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from echoic.cli import main
from echoic.data.manifest import read_manifest
from echoic.decode import segment as segment_module
from echoic.decode.segment import (
    FRAME_SECONDS,
    SegmentOptions,
    SileroVad,
    find_segments,
    speech_regions,
    split_long,
)
from echoic.errors import EchoicError
from echoic.score import score_texts

# Tests that use the session's `trained` models share one xdist worker (Makefile).
pytestmark = pytest.mark.xdist_group("trained")

GAP = 0.5  # seconds of silence between utterances in a long file
RATE = 16000


def _probs(*runs: tuple[float, float]) -> np.ndarray:
    """Per-frame probabilities from (probability, seconds) runs."""
    return np.concatenate(
        [np.full(round(seconds / FRAME_SECONDS), p, dtype=np.float32) for p, seconds in runs]
    )


# -- from probabilities to segments -------------------------------------------------------------


def test_regions_end_only_at_a_long_enough_silence():
    options = SegmentOptions(min_silence=0.3)
    probs = _probs(
        (0.0, 1.0),
        (0.9, 1.0),
        (0.4, 0.64),  # between the thresholds: neither starts nor ends a region
        (0.9, 1.0),
        (0.1, 0.16),  # a pause shorter than min_silence stays inside
        (0.9, 1.0),
        (0.1, 0.64),  # this one ends the region
        (0.9, 0.96),
        (0.0, 0.32),
        (0.9, 0.096),  # a click shorter than min_speech
        (0.0, 1.0),
    )
    # 31 frames of silence, speech to frame 149, a pause, speech from 169 to 199.
    assert speech_regions(probs, options) == [(31, 149), (169, 199)]


def test_a_region_running_to_the_end_of_the_file_is_kept():
    assert speech_regions(_probs((0.0, 1.0), (0.9, 1.0)), SegmentOptions()) == [(31, 62)]


def test_long_regions_are_cut_at_their_least_speech_like_frame():
    probs = np.full(100, 0.9, dtype=np.float32)
    probs[[30, 65]] = [0.6, 0.55]
    # The cut is searched in the second half of each 40-frame window, never the first.
    probs[5] = 0.0
    assert split_long(0, 100, probs, 40) == [(0, 30), (30, 65), (65, 100)]
    # Equal minima (speech probabilities are often exactly 1.0): the latest, long pieces.
    assert split_long(0, 100, np.ones(100, dtype=np.float32), 40) == [(0, 39), (39, 78), (78, 100)]
    assert split_long(10, 40, probs, 40) == [(10, 40)]


def test_segments_are_capped_padded_into_pauses_and_never_overlap():
    options = SegmentOptions(max_segment=5.0, pad=0.2)
    # 12 s of speech, a 0.32 s pause (half of it is 0.16 s: less than pad), 2 s of speech.
    probs = _probs((0.0, 0.96), (0.9, 12.0), (0.1, 0.32), (0.9, 2.0), (0.0, 0.96))
    duration = len(probs) * FRAME_SECONDS
    segments = find_segments(probs, duration, options)
    assert len(segments) == 4  # 12 s under a 5 s cap: three pieces
    assert all(s.end - s.start <= options.max_segment + 1e-9 for s in segments)
    assert all(a.end <= b.start for a, b in itertools.pairwise(segments))
    first, *_, third, fourth = segments
    assert first.start == pytest.approx(0.96 - 0.2)  # full pad toward the file's start
    # Cuts inside a region get no padding: the pieces meet exactly.
    assert segments[0].end == segments[1].start and segments[1].end == third.start
    assert third.end == pytest.approx(12.96 + 0.16)  # half the pause
    assert fourth.start == pytest.approx(13.28 - 0.16)
    assert fourth.end == pytest.approx(15.264 + 0.2)


def test_no_speech_gives_no_segments():
    assert find_segments(np.zeros(100, dtype=np.float32), 3.2, SegmentOptions()) == []


def test_bad_segmentation_options_are_one_line_errors():
    with pytest.raises(EchoicError, match="too short"):
        SegmentOptions(max_segment=0.3)
    with pytest.raises(EchoicError, match="threshold"):
        SegmentOptions(threshold=0.3, end_threshold=0.5)


# -- the detector -----------------------------------------------------------------------------


def test_vad_runs_on_any_rate_and_leaves_torch_threads_alone():
    """The model is found without importing silero_vad, whose import sets torch to one
    thread."""
    threads = torch.get_num_threads()
    vad = SileroVad()
    assert len(vad.probabilities(np.zeros(RATE, dtype=np.float32), RATE)) == 32  # 1 s, 32 ms
    assert len(vad.probabilities(np.zeros(8000, dtype=np.float32), 8000)) == 32
    assert vad.probabilities(np.zeros(RATE, dtype=np.float32), RATE).max() < 0.1
    assert torch.get_num_threads() == threads


def test_missing_vad_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(segment_module, "VAD_PACKAGE", "no_such_vad_package")
    with pytest.raises(EchoicError, match="silero-vad"):
        SileroVad()


# -- long recordings --------------------------------------------------------------------------


def _long_file(path, utterances):
    """The utterances one after another with GAP seconds of silence before, between and
    after them; returns where each utterance's speech (its samples above -60 dBFS; the
    synthesizers add silence of their own at the edges) starts and ends in the file."""
    gap = np.zeros(round(GAP * RATE), dtype=np.float32)
    pieces, speech, position = [gap], [], GAP
    for utterance in utterances:
        audio, rate = sf.read(utterance.audio, dtype="float32")
        assert rate == RATE
        loud = np.flatnonzero(np.abs(audio) > 1e-3)
        pieces += [audio, gap]
        speech.append((position + loud[0] / RATE, position + loud[-1] / RATE))
        position += len(audio) / RATE + GAP
    sf.write(path, np.concatenate(pieces), RATE)
    return speech


def _check_boundaries(segments, speech):
    """One segment per utterance, holding its speech (give or take 0.1 s of a fading
    edge) and none of its neighbours': every boundary falls in a pause."""
    assert len(segments) == len(speech), (segments, speech)
    for i, ((start, end), (speech_start, speech_end)) in enumerate(zip(segments, speech)):
        assert start <= speech_start + 0.1 and end >= speech_end - 0.1, (i, start, end)
        assert i == 0 or start > speech[i - 1][1], (i, start)
        assert i == len(speech) - 1 or end < speech[i + 1][0], (i, end)


@pytest.mark.slow
def test_vad_finds_one_segment_per_utterance(corpus, tmp_path):
    utterances = read_manifest(corpus / "train.jsonl").utterances[:6]
    spans = _long_file(tmp_path / "long.wav", utterances)
    samples, _ = sf.read(tmp_path / "long.wav", dtype="float32")
    probs = SileroVad().probabilities(samples, RATE)
    segments = find_segments(probs, len(samples) / RATE, SegmentOptions())
    _check_boundaries([(s.start, s.end) for s in segments], spans)


@pytest.mark.slow
def test_a_long_recording_is_cut_at_its_pauses_and_joined_in_order(trained, tmp_path, capsys):
    """Seven utterances in one file: as many segments, boundaries in the pauses, each
    segment's text what its own audio gives alone (batching changes nothing), joined in
    time order; and closer to transcribing the seven files one by one than decoding the
    long file whole is. (The tiny overfitted model garbles an utterance shifted by even
    20 ms, so segment and file texts cannot be compared word for word.)"""
    exp, manifest = trained("hybrid")
    utterances = read_manifest(manifest).utterances[:7]
    speech = _long_file(tmp_path / "long.wav", utterances)
    args = ["transcribe", "--exp", str(exp), "--method", "ctc_greedy"]
    out = tmp_path / "segments.jsonl"
    assert main([*args, "--segment-output", str(out), str(tmp_path / "long.wav")]) == 0
    text = capsys.readouterr().out.strip()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["audio"] for r in records} == {str(tmp_path / "long.wav")}
    _check_boundaries([(r["start"], r["end"]) for r in records], speech)
    assert text == " ".join(r["text"] for r in records)

    samples, _ = sf.read(tmp_path / "long.wav", dtype="float32")
    pieces = []
    for i, r in enumerate(records):
        pieces.append(str(tmp_path / f"piece{i}.wav"))
        sf.write(pieces[-1], samples[round(r["start"] * RATE) : round(r["end"] * RATE)], RATE)
    assert main([*args, *pieces]) == 0
    assert [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()] == [
        r["text"] for r in records
    ]

    assert main([*args, *(str(u.audio) for u in utterances)]) == 0
    alone = " ".join(line.split("\t")[1] for line in capsys.readouterr().out.splitlines())
    assert main([*args, "--no-segment", str(tmp_path / "long.wav")]) == 0
    whole = capsys.readouterr().out.strip()
    distance = {
        name: score_texts({"long": alone}, {"long": hyp}).chars.rate
        for name, hyp in [("segmented", text), ("whole", whole)]
    }
    assert distance["segmented"] < distance["whole"], distance


@pytest.mark.slow
def test_one_utterance_is_decoded_whole_as_before(trained, tmp_path, monkeypatch):
    """A file holding one utterance is decoded in one piece, all of it, exactly as
    without segmentation; its one segment spans the file."""
    import echoic.decode.transcribe as transcribe_module
    from echoic.data.features import compute_fbank
    from echoic.decode.decoder import decode_batch
    from echoic.decode.transcribe import transcribe
    from echoic.train.experiment import load_experiment_model

    exp, manifest = trained("hybrid")
    utterance = read_manifest(manifest).utterances[0]
    frames = []

    def spy(model, batch, options):
        frames.append(batch.feat_lens.tolist())
        return decode_batch(model, batch, options)

    monkeypatch.setattr(transcribe_module, "decode_batch", spy)
    (segmented,) = transcribe(exp, [str(utterance.audio)], method="ctc_greedy")
    (whole,) = transcribe(exp, [str(utterance.audio)], method="ctc_greedy", segmentation=None)
    assert frames[0] == frames[1] and len(frames) == 2
    spec = load_experiment_model(exp)[0].input_spec
    samples = transcribe_module.load_audio(str(utterance.audio), sample_rate=spec.sample_rate)
    assert frames[0] == [len(compute_fbank(samples, spec.sample_rate, spec.fbank))]  # all of it
    assert segmented == whole
    assert segmented.text == utterance.text
    assert [(s.start, s.end) for s in segmented.segments] == [(0.0, utterance.duration)]


def test_transcribe_flags_for_long_recordings_are_checked(tmp_path, capsys):
    assert main(["transcribe", "--exp", str(tmp_path), "--max-segment", "0.2", "x.wav"]) == 2
    assert "--max-segment 0.2 s is too short" in capsys.readouterr().err
