"""`echoic decode`: a manifest through a trained model into OUT/hyp.jsonl, with speed.

Utterances go through the data pipeline in evaluation mode (no augmentation), sorted
by duration into batches of at most `max_frames` padded frames. The encoder runs on
the whole batch; the search after it runs per utterance, except ctc_greedy, attention
and rnnt_greedy, which step through the batch together (see `decoder.METHODS`).

Speed is reported twice, both over the same audio seconds and both without model
loading: `rtf` is end to end, audio file to text (reading and resampling the audio,
fbank, batching, encoder, search: the wall clock of the whole pass), and `model_rtf`
counts only the encoder + search, the figure a caller who brings its own features sees.
With `num_workers` > 0, reading and fbank run in that many loader processes beside the
model, so the end-to-end figure is wall time on 1 + num_workers processes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from echoic.data.batch import Batch
from echoic.data.dataset import build_loader
from echoic.data.manifest import read_manifest
from echoic.decode.decoder import (
    DecodeOptions,
    ScorerSettings,
    check_options,
    decode_batch,
    decode_ctc_log_probs,
    with_scorer,
)
from echoic.decode.export import ONNX_FILE, OnnxModel
from echoic.decode.search import Hypothesis
from echoic.errors import EchoicError
from echoic.models.cif import decoded_rows
from echoic.train.experiment import load_experiment_model

# What runs on an exported graph, by the outputs it has: the CTC searches on the
# log-probabilities, a Paraformer's one pass on its tokens.
ONNX_METHODS = {"log_probs": ("ctc_greedy", "ctc_prefix_beam"), "tokens": ("paraformer",)}

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
    """Decode every utterance; returns a summary with real-time factors and speed.

    `scorer` names the hotwords and word LM the search adds. `runtime="onnx"` runs the
    exported graph (`echoic export`) in onnxruntime instead of the PyTorch model: the
    encoder + CTC for the CTC searches, a Paraformer's whole one pass for `paraformer`.
    `num_workers`: loader processes for audio reading and fbank (0: in this process,
    so the end-to-end figure is one process's)."""
    if threads is not None:
        torch.set_num_threads(threads)
    load_start = time.perf_counter()
    model, tokenizer, config = load_experiment_model(
        exp_dir, checkpoint=checkpoint, average_last=average_last
    )
    options = with_scorer(options, scorer, tokenizer)
    check_options(model, options)
    session = None
    if runtime == "onnx" and options.hotwords is not None:
        raise EchoicError(
            "the exported one pass takes no hotword list: decode with --runtime torch"
        )
    if runtime == "onnx":
        session = OnnxModel(onnx_model or Path(exp_dir) / "export" / ONNX_FILE, threads=threads)
        runs = [
            m
            for out, methods in ONNX_METHODS.items()
            if out in session.output_names
            for m in methods
        ]
        if options.method not in runs:
            raise EchoicError(
                f"--runtime onnx runs {', '.join(runs) or 'nothing'} on this export, "
                f"not {options.method}"
            )
    per_row = not getattr(model.frontend, "exact_for_padded_batches", True)
    load_seconds = time.perf_counter() - load_start
    manifest = read_manifest(manifest_path)
    # Shorter than the subsampling front accepts: skipped and counted, not a crash.
    shortest = model.frontend.seconds_for_frames(model.encoder.min_input_frames)
    data = replace(
        config.data,
        max_frames=max_frames,
        batch_size=None,
        num_workers=num_workers,
        min_duration=shortest,
        feature_cache=False,  # one pass: nothing to reuse
        hotwords=None,  # training hotwords are drawn from references: none here
    )
    loader = build_loader(
        manifest, tokenizer, data, input_spec=model.input_spec, seed=0, train=False
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    audio_seconds = model_seconds = 0.0
    # The end-to-end clock starts before the first batch is asked for: starting the
    # loader processes, reading audio and fbank are part of the time to get text.
    pass_start = time.perf_counter()
    with tqdm(total=len(manifest), unit="utt", desc=options.method, disable=not progress) as bar:
        for batch in loader:
            if not batch.size:
                continue
            start = time.perf_counter()
            best = (
                decode_batch(model, batch, options)
                if session is None
                else _decode_onnx(session, model, batch, options, per_row)
            )
            model_seconds += time.perf_counter() - start
            audio_seconds += sum(batch.durations)
            for utt_id, hypothesis in zip(batch.ids, best):
                record = {
                    "id": utt_id,
                    "text": tokenizer.decode(hypothesis.tokens),
                    "tokens": list(hypothesis.tokens),
                    "score": hypothesis.score,
                }
                if hypothesis.times is not None:  # paraformer: per token, from CIF
                    record["start"] = [round(start, 3) for start, _ in hypothesis.times]
                    record["end"] = [round(end, 3) for _, end in hypothesis.times]
                results.append(record)
            bar.update(batch.size)
    total_seconds = time.perf_counter() - pass_start
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
        # End to end, audio file to text: the headline figure.
        # Seconds to the microsecond: at millisecond rounding a fast pass's model_s (about
        # 0.05 s for 20 short utterances) disagreed with model_rtf by up to 1%.
        "total_s": round(total_seconds, 6),
        "rtf": total_seconds / audio_seconds if audio_seconds else 0.0,
        "utts_per_s": len(results) / total_seconds if total_seconds else 0.0,
        # Encoder + search only, on features already in memory.
        "model_s": round(model_seconds, 6),
        "model_rtf": model_seconds / audio_seconds if audio_seconds else 0.0,
        "load_s": round(load_seconds, 6),  # model (and ONNX session) loading, in neither RTF
        "threads": torch.get_num_threads(),
        "loader_workers": num_workers,
        "runtime": runtime,
        "input": model.input_spec.kind,  # fbank, or waveform (an SSL frontend)
    }
    (out_dir / "decode.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _decode_onnx(
    session: OnnxModel, model, batch: Batch, options, per_row: bool
) -> list[Hypothesis]:
    outputs = _onnx_outputs(session, batch, per_row)
    if "tokens" in outputs:  # a one-pass graph (see ONNX_METHODS)
        names = ("tokens", "scores", "counts", "positions", "out_lens")
        rows = decoded_rows(*(outputs[n] for n in names), model.encoder.frame_shift)
        return [Hypothesis(d.tokens, d.score, times=d.times) for d in rows]
    return decode_ctc_log_probs(outputs["log_probs"], outputs["out_lens"], options)


def _onnx_outputs(session: OnnxModel, batch: Batch, per_row: bool) -> dict[str, torch.Tensor]:
    """The exported graph's outputs for a batch: fbank and its lengths in, or waveform
    and its lengths; one utterance at a time (`per_row`) where the graph would let
    padding change the features (see SslFrontend.exact_for_padded_batches)."""
    if batch.feats is not None:
        return session(batch.feats, batch.feat_lens)
    if not per_row:
        return session(batch.audio, batch.audio_lens)
    rows = [session(row[None, : int(n)], n[None]) for row, n in zip(batch.audio, batch.audio_lens)]
    # Pad each output's time axis across rows (lengths, 1-D, are concatenated); firing
    # positions pad with -1, as the graph does beyond each count.
    return {
        name: torch.cat([r[name] for r in rows])
        if rows[0][name].dim() == 1
        else torch.nn.utils.rnn.pad_sequence(
            [r[name][0] for r in rows],
            batch_first=True,
            padding_value=-1 if name == "positions" else 0,
        )
        for name in rows[0]
    }
