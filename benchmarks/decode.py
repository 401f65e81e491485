"""Decoding speed and accuracy of a trained experiment, per method and thread count.

Prints one JSON line per (method, runtime, threads): rtf, end to end (audio file to
text: reading, fbank, encoder, search, all in one process with that many torch threads;
model loading excluded) over audio seconds; model_rtf, the encoder + search alone; wer
and cer on the manifest; utterances per second, end to end. The encoder runs on whole
batches; the searches other than ctc_greedy, attention and rnnt_greedy run utterance by
utterance.
Every method the model's heads allow (or --methods) is run with PyTorch; the first
method the model's export runs (ctc_greedy, or paraformer for a Paraformer) also
through the exported ONNX model and its int8 copy (exported first if missing); with --lm, the
methods that take a word LM once more with it (runtime "torch+lm"). With --hotwords,
the methods that take hotwords decode --hotword-manifest without and with them (on
the first thread count only; runtime "...+hotwords"), and their lines add hotword
recall, precision, B-WER and U-WER. --exp may be given more than once: each
experiment's rows in turn, in one run (a Paraformer beside the hybrid it is compared
with; --methods then lists what any of them has, and each runs its own).

    python benchmarks/decode.py --exp exp/demo --manifest data/synth_en/test.jsonl \
        --lm data/synth_en/lm_text.txt --hotwords data/synth_en/hotwords.txt
    python benchmarks/decode.py --exp exp/paraformer --exp exp/demo \
        --methods paraformer,attention,attention_rescoring
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
from pathlib import Path

from echoic.decode.context import read_hotwords
from echoic.decode.decoder import METHODS, DecodeOptions, ScorerSettings, available_methods
from echoic.decode.export import ONNX_FILE, ONNX_INT8_FILE, export_model, quantize_onnx
from echoic.decode.run import ONNX_METHODS, decode_manifest
from echoic.models.contract import TakesHotwords
from echoic.score import score_files
from echoic.train.experiment import load_experiment_model


def _biased(method: str) -> bool:
    """Whether the method takes a prefix scorer (hotwords, word LM)."""
    return METHODS[method][1]


def _takes_hotwords(method: str, model) -> bool:
    """A prefix scorer's hotword graph, or a contextual Paraformer's hotword list."""
    return _biased(method) or (method == "paraformer" and isinstance(model, TakesHotwords))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", action="append", help="experiment folder (default exp/demo)")
    parser.add_argument("--manifest", default="data/synth_en/test.jsonl")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--beam", type=int, default=10)
    parser.add_argument("--ctc-weight", type=float, default=0.5, help="attention_rescoring")
    parser.add_argument("--attention-weight", type=float, default=1.0, help="attention_rescoring")
    parser.add_argument("--methods", help="comma-separated subset (default: all the model has)")
    parser.add_argument("--lm", help="word LM text or manifest: adds LM rows")
    parser.add_argument("--hotwords", help="hotword file: adds hotword rows")
    parser.add_argument("--hotword-manifest", default="data/synth_en/hotword_test.jsonl")
    args = parser.parse_args()
    exps = [Path(exp) for exp in args.exp or ["exp/demo"]]
    if args.methods:
        known = {m for exp in exps for m in available_methods(load_experiment_model(exp)[0])}
        unknown = [m for m in args.methods.split(",") if m not in known]
        if unknown:
            parser.error(f"no experiment has {', '.join(unknown)} (they have {sorted(known)})")
    for exp in exps:
        run_experiment(exp, args)


def run_experiment(exp: Path, args: argparse.Namespace) -> None:
    model, _, _ = load_experiment_model(exp)
    methods = available_methods(model)
    if args.methods:
        methods = [m for m in args.methods.split(",") if m in methods]
    # (method, runtime label, manifest, LM, hotword file, ONNX model)
    runs = [(m, "torch", args.manifest, None, None, None) for m in methods]
    if args.lm:
        runs += [(m, "torch+lm", args.manifest, args.lm, None, None) for m in methods if _biased(m)]
    # The method the exported graph runs: by the graph's outputs (CTC log-probabilities
    # or a Paraformer's tokens).
    exported = next(ONNX_METHODS[out][0] for out in model.export_outputs if out in ONNX_METHODS)
    if exported in methods:
        export_dir = exp / "export"
        # torch.onnx reports its progress on stdout, which is for the JSON lines.
        with contextlib.redirect_stdout(sys.stderr):
            if not (export_dir / ONNX_FILE).is_file():
                quantize_onnx(export_model(model, export_dir, "onnx"))
            elif not (export_dir / ONNX_INT8_FILE).is_file():
                quantize_onnx(export_dir / ONNX_FILE)
        runs += [
            (exported, "onnx", args.manifest, None, None, export_dir / ONNX_FILE),
            (exported, "onnx-int8", args.manifest, None, None, export_dir / ONNX_INT8_FILE),
        ]
    hotword_runs = []
    if args.hotwords:
        for lm, label in [(None, "torch"), *([(args.lm, "torch+lm")] if args.lm else [])]:
            for method in methods:
                if not _takes_hotwords(method, model) or (lm and not _biased(method)):
                    continue
                for hotwords in (None, args.hotwords):
                    runtime = label + ("+hotwords" if hotwords else "")
                    hotword_runs.append(
                        (method, runtime, args.hotword_manifest, lm, hotwords, None)
                    )
    phrases = [h.phrase for h in read_hotwords(args.hotwords)] if args.hotwords else None
    thread_counts = [int(t) for t in args.threads.split(",")]
    for threads in thread_counts:
        todo = runs + (hotword_runs if threads == thread_counts[0] else [])
        for method, runtime, manifest, lm, hotwords, onnx_model in todo:
            with tempfile.TemporaryDirectory() as out:
                summary = decode_manifest(
                    exp,
                    manifest,
                    out,
                    DecodeOptions(
                        method,
                        beam=args.beam,
                        ctc_weight=args.ctc_weight,
                        attention_weight=args.attention_weight,
                    ),
                    threads=threads,
                    runtime="onnx" if onnx_model else "torch",
                    scorer=ScorerSettings(hotwords=hotwords, lm=lm),
                    onnx_model=onnx_model,
                    num_workers=0,  # audio and fbank in this process: a one-process figure
                    progress=False,
                )
                is_hotword_run = manifest == args.hotword_manifest and phrases is not None
                report = score_files(
                    manifest, Path(out) / "hyp.jsonl", hotwords=phrases if is_hotword_run else None
                )
            row = {
                "method": method,
                "runtime": runtime,
                "threads": threads,
                "rtf": round(summary["rtf"], 5),  # end to end, the headline
                "model_rtf": round(summary["model_rtf"], 5),  # encoder + search only
                "wer": round(report.words.rate, 4),
                "cer": round(report.chars.rate, 4),
                "utts_per_s": round(summary["utts_per_s"], 2),
                "utterances": summary["utterances"],
                "manifest": str(manifest),
                "beam": args.beam,
                **(
                    {"ctc_weight": args.ctc_weight, "attention_weight": args.attention_weight}
                    if method == "attention_rescoring"
                    else {}
                ),
                "exp": str(exp),
                "machine": platform.machine(),
            }
            if report.hotwords:
                row.update(
                    {
                        f"hotword_{k}": None if v is None else round(v, 4)
                        for k, v in report.hotwords.items()
                        if k in ("recall", "precision", "b_wer", "u_wer")
                    }
                )
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
