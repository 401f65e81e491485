"""`echoic decode`: a manifest through a trained model into OUT/hyp.jsonl, with speed.

Utterances go through the data pipeline in evaluation mode (no augmentation), sorted
by duration into batches of at most `max_frames` padded frames.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from echoic.data.dataset import build_loader
from echoic.data.manifest import read_manifest
from echoic.decode.decoder import (
    DecodeOptions,
    ScorerSettings,
    check_options,
    decode_batch,
    decode_ctc_log_probs,
    load_experiment_model,
)
from echoic.decode.export import ONNX_FILE, OnnxCtc
from echoic.errors import EchoicError

ONNX_METHODS = ("ctc_greedy", "ctc_prefix_beam")  # what runs on the exported CTC log-probabilities

log = logging.getLogger(__name__)


def decode_manifest(
    exp_dir: str | Path,
    manifest_path: str | Path,
    out_dir: str | Path,
    options: DecodeOptions,
    *,
    scorer: ScorerSettings | None = None,
    checkpoint: str | None = None,
    average_last: int | None = None,
    max_frames: int = 20000,
    num_workers: int = 1,
    threads: int | None = None,
    runtime: str = "torch",
    onnx_model: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Decode every utterance; returns a summary with real-time factor and speed.

    `scorer` names the hotwords and word LM the search adds. `runtime="onnx"` runs the
    exported encoder + CTC (`echoic export`) in onnxruntime for the CTC searches
    instead of the PyTorch model."""
    if threads is not None:
        torch.set_num_threads(threads)
    model, tokenizer, config = load_experiment_model(
        exp_dir, checkpoint=checkpoint, average_last=average_last
    )
    context = (scorer or ScorerSettings()).build(tokenizer)
    if context is not None:  # else keep whatever context the caller's options carry
        options = replace(options, context=context)
    check_options(model, options)
    session = None
    if runtime == "onnx":
        if options.method not in ONNX_METHODS:
            raise EchoicError(
                f"--runtime onnx runs {', '.join(ONNX_METHODS)}, not {options.method}"
            )
        session = OnnxCtc(onnx_model or Path(exp_dir) / "export" / ONNX_FILE, threads=threads)
    manifest = read_manifest(manifest_path)
    # Shorter than the subsampling front accepts: skipped and counted, not a crash.
    shortest = model.input_spec.seconds_for_frames(model.encoder.min_input_frames)
    data = replace(
        config.data,
        max_frames=max_frames,
        batch_size=None,
        num_workers=num_workers,
        min_duration=shortest,
        feature_cache=False,  # one pass: nothing to reuse
    )
    loader = build_loader(
        manifest, tokenizer, data, input_spec=model.input_spec, seed=0, train=False
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    audio_seconds = compute_seconds = 0.0
    with tqdm(total=len(manifest), unit="utt", desc=options.method, disable=not progress) as bar:
        for batch in loader:
            if not batch.size:
                continue
            start = time.perf_counter()
            best = (
                decode_batch(model, batch, options)
                if session is None
                else decode_ctc_log_probs(*session(batch.feats, batch.feat_lens), options)
            )
            compute_seconds += time.perf_counter() - start
            audio_seconds += sum(batch.durations)
            for utt_id, hypothesis in zip(batch.ids, best):
                results.append(
                    {
                        "id": utt_id,
                        "text": tokenizer.decode(hypothesis.tokens),
                        "tokens": list(hypothesis.tokens),
                        "score": hypothesis.score,
                    }
                )
            bar.update(batch.size)
    order = {u.id: i for i, u in enumerate(manifest.utterances)}
    results.sort(key=lambda r: order[r["id"]])
    with (out_dir / "hyp.jsonl").open("w") as stream:
        for record in results:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    report = loader.last_report
    summary = {
        "method": options.method,
        "utterances": len(results),
        "skipped": sum(report.skipped.values()) if report else 0,
        "audio_s": round(audio_seconds, 2),
        "decode_s": round(compute_seconds, 3),
        "rtf": compute_seconds / audio_seconds if audio_seconds else 0.0,
        "utts_per_s": len(results) / compute_seconds if compute_seconds else 0.0,
        "threads": torch.get_num_threads(),
        "runtime": runtime,
    }
    (out_dir / "decode.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
