"""`echoic prepare`: train a tokenizer and compute global CMVN statistics for a manifest.

Writes to the output folder:
    tokenizer.json   the tokenizer (char or sentencepiece BPE, self-contained)
    cmvn.json        fbank sums, sums of squares and frame count (exact, merge-able)
    prepare.json     the report: utterances used and skipped, vocabulary, <unk> rates
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from echoic.data.audio import load_audio
from echoic.data.features import CmvnStats, FbankConfig, compute_fbank
from echoic.data.manifest import Manifest, read_manifest
from echoic.data.tokenizer import BpeTokenizer, CharTokenizer, Tokenizer
from echoic.data.workers import fork_map
from echoic.errors import AudioError, EchoicError

log = logging.getLogger(__name__)

_CHUNK = 32  # utterances per CMVN work item


def unknown_report(manifest: Manifest, tokenizer: Tokenizer) -> dict:
    """How much of a manifest's text the tokenizer maps to <unk>."""
    unknown: Counter[str] = Counter()
    tokens = 0
    for utterance in manifest.utterances:
        tokens += len(tokenizer.encode(utterance.text))
        unknown.update(tokenizer.unknown_chars(utterance.text))
    total = sum(unknown.values())
    return {
        "manifest": str(manifest.path),
        "utterances": len(manifest),
        "tokens": tokens,
        "unknown_chars": total,
        "unknown_rate": total / tokens if tokens else 0.0,
        "top_unknown": dict(unknown.most_common(10)),
    }


def _cmvn_chunk(job: tuple[list[tuple[str, str, float, float]], int, FbankConfig]) -> tuple:
    items, sample_rate, fbank = job
    stats = CmvnStats.empty(sample_rate, fbank)
    skipped: list[tuple[str, str, str]] = []
    for utt_id, audio, offset, duration in items:
        try:
            samples = load_audio(
                audio, sample_rate=sample_rate, offset=offset, duration=duration or None
            )
        except AudioError as error:
            skipped.append((utt_id, error.reason, str(error)))
            continue
        feats = compute_fbank(samples, sample_rate, fbank)
        if feats.shape[0] == 0:
            skipped.append((utt_id, "too_short", "too short for a single feature frame"))
            continue
        stats.add(feats)
    return stats, skipped, len(items)


def compute_cmvn(
    manifest: Manifest, sample_rate: int, fbank: FbankConfig, jobs: int = 1, progress: bool = True
) -> tuple[CmvnStats, list[tuple[str, str, str]]]:
    """Global CMVN over every readable utterance (no augmentation, no dither).

    Chunks are merged in manifest order, so the sums do not depend on `jobs`.
    Returns the stats and the (id, reason, message) of each utterance skipped.
    """
    fbank = FbankConfig(fbank.num_mel_bins, fbank.frame_length_ms, fbank.frame_shift_ms, 0.0)
    items = [(u.id, u.audio, u.offset, u.duration) for u in manifest.utterances]
    work = [(items[i : i + _CHUNK], sample_rate, fbank) for i in range(0, len(items), _CHUNK)]
    stats = CmvnStats.empty(sample_rate, fbank)
    skipped: list[tuple[str, str, str]] = []
    with tqdm(total=len(items), desc="cmvn", unit="utt", disable=not progress) as bar:
        results = list(_ordered(fork_map(_cmvn_chunk, work, jobs, name="cmvn"), bar))
    for chunk_stats, chunk_skipped, _ in results:
        stats.merge(chunk_stats)
        skipped.extend(chunk_skipped)
    if stats.count == 0:
        raise EchoicError(f"{manifest.path}: no readable audio to compute CMVN statistics from")
    return stats, skipped


def _ordered(results, bar):
    for result in results:
        bar.update(result[2])
        yield result


def prepare(
    manifest_path: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str = "char",
    vocab_size: int = 500,
    character_coverage: float = 1.0,
    sample_rate: int = 16000,
    fbank: FbankConfig | None = None,
    report_on: list[str] | None = None,
    jobs: int | None = None,
    progress: bool = True,
) -> dict:
    manifest = read_manifest(manifest_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fbank = fbank or FbankConfig()
    texts = [u.text for u in manifest.utterances if u.text.strip()]
    if not texts:
        raise EchoicError(f"{manifest.path}: every transcript is empty")
    if tokenizer == "char":
        trained: Tokenizer = CharTokenizer.train(texts)
    elif tokenizer == "bpe":
        trained = BpeTokenizer.train(texts, vocab_size, character_coverage)
    else:
        raise EchoicError(f"unknown tokenizer '{tokenizer}' (allowed: char, bpe)")
    trained.save(out_dir / "tokenizer.json")
    log.info("%s tokenizer: %d tokens", tokenizer, trained.vocab_size)

    stats, skipped = compute_cmvn(
        manifest, sample_rate, fbank, jobs or os.cpu_count() or 1, progress
    )
    stats.save(out_dir / "cmvn.json")
    reasons = Counter(reason for _, reason, _ in skipped)
    report = {
        "manifest": str(manifest.path),
        "utterances": len(manifest),
        "empty_transcripts": len(manifest) - len(texts),
        "tokenizer": tokenizer,
        "vocab_size": trained.vocab_size,
        "cmvn_frames": stats.count,
        "cmvn_hours": stats.count * fbank.frame_shift_ms / 1000 / 3600,
        "fbank": asdict(fbank),
        "sample_rate": sample_rate,
        "skipped_audio": dict(reasons),
        "skipped_examples": [f"{utt}: {message}" for utt, _, message in skipped[:5]],
        "unknown": [unknown_report(manifest, trained)]
        + [unknown_report(read_manifest(path), trained) for path in report_on or []],
    }
    (out_dir / "prepare.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    for reason, count in sorted(reasons.items()):
        log.warning(
            "cmvn: skipped %d utterances (%s), e.g. %s",
            count,
            reason,
            report["skipped_examples"][0],
        )
    return report
