"""Decoding speed and accuracy of a trained experiment, per method and thread count.

Prints one JSON line per (method, runtime, threads): rtf (decode seconds / audio
seconds, model load excluded), wer and cer on the manifest, utterances per second.
Every method the model's heads allow is run with PyTorch; ctc_greedy also through the
exported ONNX model and its int8 copy (exported first if missing); with --lm, the
methods that take a word LM once more with it (runtime "torch+lm").

    python benchmarks/decode.py --exp exp/demo --manifest data/synth_en/test.jsonl \
        --lm data/synth_en/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from echoic.decode.decoder import DecodeOptions, available_methods, load_experiment_model
from echoic.decode.export import ONNX_FILE, ONNX_INT8_FILE, export_model, quantize_onnx
from echoic.decode.run import decode_manifest
from echoic.score import score_files

LM_METHODS = ("ctc_prefix_beam", "attention_rescoring", "rnnt_beam")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", default="exp/demo")
    parser.add_argument("--manifest", default="data/synth_en/test.jsonl")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--beam", type=int, default=10)
    parser.add_argument("--methods", help="comma-separated subset (default: all the model has)")
    parser.add_argument("--lm", help="word LM text or manifest: adds LM rows")
    args = parser.parse_args()
    exp = Path(args.exp)
    model, _, _ = load_experiment_model(exp)
    methods = args.methods.split(",") if args.methods else available_methods(model)
    export_dir = exp / "export"
    if not (export_dir / ONNX_FILE).is_file():
        quantize_onnx(export_model(model, export_dir, "onnx"))
    elif not (export_dir / ONNX_INT8_FILE).is_file():
        quantize_onnx(export_dir / ONNX_FILE)
    runs = [(m, "torch", None) for m in methods]
    if args.lm:
        runs += [(m, "torch+lm", None) for m in methods if m in LM_METHODS]
    if "ctc_greedy" in available_methods(model):
        runs += [
            ("ctc_greedy", "onnx", export_dir / ONNX_FILE),
            ("ctc_greedy", "onnx-int8", export_dir / ONNX_INT8_FILE),
        ]
    for threads in (int(t) for t in args.threads.split(",")):
        for method, runtime, onnx_model in runs:
            with tempfile.TemporaryDirectory() as out:
                summary = decode_manifest(
                    exp,
                    args.manifest,
                    out,
                    DecodeOptions(method, beam=args.beam),
                    threads=threads,
                    runtime="onnx" if onnx_model else "torch",
                    lm=args.lm if runtime == "torch+lm" else None,
                    onnx_model=onnx_model,
                    num_workers=0,
                    progress=False,
                )
                report = score_files(args.manifest, Path(out) / "hyp.jsonl")
            print(
                json.dumps(
                    {
                        "method": method,
                        "runtime": runtime,
                        "threads": threads,
                        "rtf": round(summary["rtf"], 5),
                        "wer": round(report.words.rate, 4),
                        "cer": round(report.chars.rate, 4),
                        "utts_per_s": round(summary["utts_per_s"], 2),
                        "utterances": summary["utterances"],
                        "beam": args.beam,
                        "exp": str(exp),
                        "machine": platform.machine(),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
