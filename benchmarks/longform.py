"""Long recordings through `echoic transcribe`: WER against the same utterances one by one,
and speed and memory on a 10-minute file.

Builds long files from a manifest's utterances (in manifest order, a random pause of
--gap seconds before each and after the last; the pauses are digital silence, as in
the corpus) and prints one JSON object:

- `wer`: all utterances (or the first --wer-minutes of them) in one file. WER of the
  utterances decoded one by one (`echoic decode`), of the long file cut at its pauses
  (long-form), and of the long-form text against the one-by-one text; all three scored
  on the joined texts, so word errors at utterance edges count alike.
- `short_file`: the first ~--short-seconds of utterances, the issue's 84 s case, also
  decoded whole (segmentation off: what `echoic transcribe` did before).
- `ten_minutes`: a --minutes file (the utterances repeated) transcribed in a fresh
  process: wall time from reading the file to its text (model load excluded, reported
  apart), its real-time factor, the VAD's share, and peak RSS.

    python benchmarks/longform.py --corpus data/synth_en --exp exp/demo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from echoic.data.audio import load_audio
from echoic.data.manifest import read_manifest, write_manifest
from echoic.decode.decoder import DecodeOptions
from echoic.decode.run import decode_manifest
from echoic.decode.segment import SegmentOptions, SileroVad
from echoic.decode.transcribe import Transcriber
from echoic.score import align, read_hypotheses, words

MEASURE_TIMEOUT_S = 3600  # the 10-minute file's child process; a hang must not block forever


def _wer(ref: str, hyp: str) -> float:
    counts, _ = align(words(ref), words(hyp))
    return round(counts.rate, 4)


def _long_file(path: Path, utterances, rate: int, gap: tuple[float, float], seed: int) -> float:
    """Writes the utterances with random pauses between them; returns the file's seconds."""
    rng = random.Random(seed)
    pieces = []
    for utterance in utterances:
        pieces.append(np.zeros(round(rng.uniform(*gap) * rate), dtype=np.float32))
        offset = utterance.offset
        pieces.append(
            load_audio(
                utterance.audio,
                sample_rate=rate,
                offset=offset,
                duration=utterance.duration if offset else None,
            )
        )
    pieces.append(np.zeros(round(rng.uniform(*gap) * rate), dtype=np.float32))
    samples = np.concatenate(pieces)
    sf.write(path, samples, rate)
    return len(samples) / rate


def _take(utterances, seconds: float | None, gap: float) -> list:
    """The first utterances that, each with a `gap`-second pause, fill at least `seconds`
    (all of them: None)."""
    if seconds is None:
        return list(utterances)
    taken, total = [], 0.0
    for utterance in utterances:
        if total >= seconds:
            break
        taken.append(utterance)
        total += utterance.duration + gap
    return taken


def _compare(args, transcriber, utterances, work: Path, name: str, rate: int) -> dict:
    """WERs of one-by-one, long-form (and, when asked, whole-file) decoding of one file."""
    manifest = work / f"{name}.jsonl"
    write_manifest(manifest, utterances)
    out = work / name
    decode_manifest(
        args.exp,
        manifest,
        out,
        DecodeOptions(args.method, beam=args.beam),
        threads=args.threads,
        num_workers=0,
        progress=False,
    )
    hyps = read_hypotheses(out / "hyp.jsonl")
    reference = " ".join(u.text for u in utterances)
    one_by_one = " ".join(hyps.get(u.id, "") for u in utterances)
    audio = work / f"{name}.wav"
    seconds = _long_file(audio, utterances, rate, tuple(args.gap), args.seed)
    result = transcriber(str(audio))
    return {
        "utterances": len(utterances),
        "audio_s": round(seconds, 1),
        "segments": len(result.segments),
        "wer_one_by_one": _wer(reference, one_by_one),
        "wer_longform": _wer(reference, result.text),
        "wer_longform_vs_one_by_one": _wer(one_by_one, result.text),
    }


def _measure(args) -> None:
    """In a fresh process: time one file from reading to text, and peak memory."""
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    transcriber = Transcriber(
        args.exp,
        method=args.method,
        options=DecodeOptions("", beam=args.beam),
        segmentation=SegmentOptions(max_segment=args.max_segment, pad=args.pad),
    )
    load_s = time.perf_counter() - start
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = transcriber(args.measure)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rate = transcriber.model.input_spec.sample_rate
    samples = load_audio(args.measure, sample_rate=rate)
    start = time.perf_counter()
    SileroVad().probabilities(samples, rate)
    vad_s = time.perf_counter() - start
    seconds = len(samples) / rate
    print(
        json.dumps(
            {
                "audio_s": round(seconds, 1),
                "wall_s": round(wall, 2),
                "rtf": round(wall / seconds, 5),
                "vad_s": round(vad_s, 2),
                "segments": len(result.segments),
                "model_load_s": round(load_s, 2),
                "rss_after_load_mb": round(rss_after_load / 1024),  # ru_maxrss is in KiB
                "peak_rss_mb": round(peak / 1024),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="data/synth_en")
    parser.add_argument("--exp", default="exp/demo")
    parser.add_argument("--manifest", help="utterances to use (default: CORPUS/test.jsonl)")
    parser.add_argument("--method", default="ctc_greedy")
    parser.add_argument("--beam", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gap", type=float, nargs=2, default=[0.3, 0.8], help="pause range, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-segment", type=float, default=SegmentOptions.max_segment)
    parser.add_argument("--pad", type=float, default=SegmentOptions.pad)
    parser.add_argument("--wer-minutes", type=float, help="cap the WER file (default: all)")
    parser.add_argument("--short-seconds", type=float, default=84.0)
    parser.add_argument("--minutes", type=float, default=10.0, help="the speed/memory file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process's file
    args = parser.parse_args()
    if args.measure:
        _measure(args)
        return
    torch.set_num_threads(args.threads)
    manifest = Path(args.manifest or Path(args.corpus) / "test.jsonl")
    utterances = read_manifest(manifest).utterances
    segmentation = SegmentOptions(max_segment=args.max_segment, pad=args.pad)
    options = DecodeOptions("", beam=args.beam)
    transcriber = Transcriber(
        args.exp, method=args.method, options=options, segmentation=segmentation
    )
    whole = Transcriber(args.exp, method=args.method, options=options, segmentation=None)
    rate = transcriber.model.input_spec.sample_rate
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gap = sum(args.gap) / 2  # the mean pause
        cap = args.wer_minutes * 60 if args.wer_minutes else None
        wer = _compare(args, transcriber, _take(utterances, cap, gap), work, "wer", rate)
        short_utts = _take(utterances, args.short_seconds, gap)
        short = _compare(args, transcriber, short_utts, work, "short", rate)
        reference = " ".join(u.text for u in short_utts)
        short["wer_whole_file"] = _wer(reference, whole(str(work / "short.wav")).text)
        copies = 1 + int(args.minutes * 60 / sum(u.duration for u in utterances))
        repeated = _take(utterances * copies, args.minutes * 60, gap)
        ten = work / "ten.wav"
        _long_file(ten, repeated, rate, tuple(args.gap), args.seed)
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--measure", str(ten)],
            capture_output=True,
            text=True,
            timeout=MEASURE_TIMEOUT_S,
            check=True,
        )
        ten_minutes = json.loads(child.stdout.strip().splitlines()[-1])
    print(
        json.dumps(
            {
                "exp": args.exp,
                "manifest": str(manifest),
                "method": args.method,
                **({"beam": args.beam} if args.method != "ctc_greedy" else {}),
                "threads": args.threads,
                "max_segment_s": args.max_segment,
                "pad_s": args.pad,
                "gap_s": args.gap,
                "wer": wer,
                "short_file": short,
                "ten_minutes": ten_minutes,
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
