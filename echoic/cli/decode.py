"""The commands that use a trained model: decode, transcribe, export, and score its output.

Each parser sits beside its handler; the decoding flags decode and transcribe share are
in echoic.cli.options.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from echoic.cli.options import (
    add_checkpoint_options,
    add_decoding_options,
    add_exp_option,
    add_no_progress_option,
    scorer_settings,
    search_options,
)
from echoic.errors import EchoicError


def add_decode_parser(commands: argparse._SubParsersAction) -> None:
    decode = commands.add_parser(
        "decode",
        help="decode a manifest with a trained model",
        description="Decode a manifest with an experiment's model into OUT/hyp.jsonl (id, text, "
        "tokens, score) and OUT/decode.json. Batches of up to --max-frames padded frames go "
        "through the encoder together; the search then runs per utterance, except "
        "ctc_greedy, attention and rnnt_greedy, which step through the batch together. "
        "Prints two real-time factors over the same audio, model loading in neither: end "
        "to end, audio file to text (reading, resampling, fbank, encoder, search), and "
        "model only (encoder + search).",
    )
    add_exp_option(decode, help="experiment folder")
    decode.add_argument("--manifest", required=True)
    decode.add_argument(
        "--method",
        required=True,
        help="ctc_greedy, ctc_prefix_beam, attention, attention_rescoring, rnnt_greedy, "
        "rnnt_beam or paraformer (those the model's heads allow)",
    )
    decode.add_argument("--out", required=True, help="output folder")
    add_decoding_options(decode)
    add_checkpoint_options(decode)
    decode.add_argument("--max-frames", type=int, default=20000, help="padded frames per batch")
    decode.add_argument("--threads", type=int, help="torch CPU threads")
    decode.add_argument(
        "--workers",
        type=int,
        default=1,
        help="loader processes reading audio and computing fbank beside the model "
        "(0: in the decoding process, for a one-process end-to-end RTF)",
    )
    decode.add_argument(
        "--runtime",
        choices=["torch", "onnx"],
        default="torch",
        help="onnx: the exported encoder+CTC in onnxruntime (echoic export first)",
    )
    decode.add_argument("--onnx-model", help="with --runtime onnx (default: EXP/export/model.onnx)")
    add_no_progress_option(decode, help=None)  # decode's flag has never had a help text
    decode.set_defaults(run=run_decode)


def run_decode(args: argparse.Namespace) -> None:
    from echoic.decode.run import decode_manifest

    summary = decode_manifest(
        args.exp,
        args.manifest,
        args.out,
        search_options(args, args.method),
        scorer=scorer_settings(args),
        checkpoint=args.checkpoint,
        average_last=args.average_last,
        max_frames=args.max_frames,
        num_workers=args.workers,
        threads=args.threads,
        runtime=args.runtime,
        onnx_model=args.onnx_model,
        progress=not args.no_progress,
    )
    workers = summary["loader_workers"]
    where = f"{workers} loader process{'es' if workers > 1 else ''}" if workers else "this process"
    # An SSL model reads waveform: its upstream, inside the model, does the features.
    reading = "reading and fbank" if summary["input"] == "fbank" else "reading audio"
    print(
        f"decoded {summary['utterances']} utterances with {summary['method']} "
        f"({summary['runtime']}): RTF {summary['rtf']:.4f} end to end, audio file to text "
        f"({summary['total_s']:.1f} s for {summary['audio_s']:.1f} s of audio; {reading} "
        f"in {where}); model only {summary['model_rtf']:.4f} (encoder + search, "
        f"{summary['model_s']:.1f} s); {summary['utts_per_s']:.1f} utterances/s; "
        f"wrote {Path(args.out) / 'hyp.jsonl'}"
    )


def add_transcribe_parser(commands: argparse._SubParsersAction) -> None:
    transcribe = commands.add_parser(
        "transcribe",
        help="print the transcript of audio files",
        description="Transcribe audio files (any format soundfile reads, any rate, any channels). "
        "Recordings of more than one utterance are cut at their pauses by a voice-activity "
        "detector and decoded in pieces.",
    )
    add_exp_option(transcribe, help="experiment folder")
    transcribe.add_argument("audio", nargs="+", help="audio files")
    transcribe.add_argument("--method", help="decoding method (default: the best the model has)")
    add_decoding_options(transcribe)
    add_checkpoint_options(transcribe, average_last=False)
    transcribe.add_argument(
        "--segment-output",
        metavar="FILE",
        help="write one JSON line per decoded segment: audio, start, end (seconds), text",
    )
    transcribe.add_argument(
        "--max-segment",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="longer stretches of speech are cut at their least speech-like point",
    )
    transcribe.add_argument(
        "--no-segment",
        action="store_true",
        help="decode each file whole, without voice-activity segmentation (long files need "
        "memory quadratic in their length)",
    )
    transcribe.set_defaults(run=run_transcribe)


def run_transcribe(args: argparse.Namespace) -> None:
    from echoic.decode.segment import SegmentOptions
    from echoic.decode.transcribe import transcribe

    segmentation = None if args.no_segment else SegmentOptions(max_segment=args.max_segment)
    segment_stream = open(args.segment_output, "w") if args.segment_output else None  # noqa: SIM115
    try:
        for result in transcribe(
            args.exp,
            args.audio,
            method=args.method,
            options=search_options(args, args.method or ""),
            checkpoint=args.checkpoint,
            scorer=scorer_settings(args),
            segmentation=segmentation,
        ):
            print(f"{result.path}\t{result.text}" if len(args.audio) > 1 else result.text)
            for segment in result.segments if segment_stream else []:
                record = {
                    "audio": result.path,
                    "start": round(segment.start, 3),
                    "end": round(segment.end, 3),
                    "text": segment.text,
                }
                segment_stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if segment_stream:
            segment_stream.close()


EXPORT_DESCRIPTION = """\
Export a model's decoding path with dynamic batch and time axes: CMVN -> encoder ->
CTC log-probabilities, or for a Paraformer its whole one pass (see below).

--format onnx writes OUT/model.onnx and, unless --no-quantize, OUT/model.int8.onnx
(dynamic int8: weights int8, activations quantized at run time); --format torchscript
writes OUT/model.ts. Every one of them takes and gives the same tensors:

  in:  feats      (B, T, F) float32  log-mel fbank, NOT normalised, zero-padded
       feat_lens  (B,) int64         frames per utterance
  out: log_probs  (B, T', V) float32 CTC log-probabilities, blank id 0
       out_lens   (B,) int64         output frames per utterance (T' ~ T / subsampling)

A Paraformer's graph runs encoder, CIF and the parallel decoder (with no hotword list)
and gives the best token per position, N = T' + 1 positions (T' with cif.tail_threshold
0) of which `counts` are real:

  out: tokens     (B, N) int64       scores (B, N) float32 (their log-probabilities)
       counts     (B,) int64         positions (B, N) int64 (CIF firing frame, -1 after)
       out_lens   (B,) int64

The features are those echoic computes: kaldi-native-fbank at the model's sample rate
(16 kHz unless its config says otherwise: resample first), samples in [-1, 1] scaled
by 32768, the model's mel bins (F, 80 by default), 25 ms frames every 10 ms unless
configured otherwise, no dither, kaldi's defaults otherwise (povey window,
pre-emphasis 0.97, snip_edges). Global CMVN from `echoic prepare` is inside the graph
(when the model has global_cmvn, the default), so feed raw fbank. OUT/export.json
records the exact settings, the fewest frames the encoder takes, and the vocabulary
size."""


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="export the encoder + CTC path (ONNX, TorchScript)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=EXPORT_DESCRIPTION,
    )
    add_exp_option(export)
    export.add_argument(
        "--format",
        choices=["onnx", "torchscript", "hf"],
        required=True,
        help="hf: a HuBERT model's backbone as a HuggingFace folder (for the ssl frontend)",
    )
    export.add_argument("--out", help="output folder (default: EXP/export)")
    export.add_argument("--no-quantize", action="store_true", help="ONNX: skip the int8 copy")
    add_checkpoint_options(export)
    export.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> None:
    from echoic.decode.export import export_info, export_model, quantize_onnx, write_export_info
    from echoic.models.contract import HuggingFaceExport
    from echoic.train.experiment import load_experiment_model

    model, _, _ = load_experiment_model(
        args.exp, checkpoint=args.checkpoint, average_last=args.average_last
    )
    out = Path(args.out) if args.out else Path(args.exp) / "export"
    if args.format == "hf":
        if not isinstance(model, HuggingFaceExport):
            raise EchoicError(
                "--format hf needs a model that writes a HuggingFace folder (today a HuBERT "
                "pretraining model, model.hubert); use onnx"
            )
        print("wrote " + ", ".join(str(p) for p in model.save_huggingface(out)))
        return
    path = export_model(model, out, args.format)
    written = [path]
    if args.format == "onnx" and not args.no_quantize:
        written.append(quantize_onnx(path))
    write_export_info(out, export_info(model, args.format, written))
    print("wrote " + ", ".join(str(p) for p in written))


def add_score_parser(commands: argparse._SubParsersAction) -> None:
    score = commands.add_parser(
        "score",
        help="word and character error rates",
        description="Score hypotheses against a reference manifest: WER, CER, S/D/I, an alignment "
        "file, the worst utterances; with --hotwords, recall, precision, B-WER and U-WER.",
    )
    score.add_argument("--ref", required=True, help="reference manifest")
    score.add_argument("--hyp", required=True, help="hyp.jsonl from echoic decode")
    score.add_argument("--lowercase", action="store_true", help="lower-case both sides first")
    score.add_argument(
        "--remove-punctuation", action="store_true", help="drop punctuation on both sides"
    )
    score.add_argument("--hotwords", help="hotword file: adds recall, precision, B-WER, U-WER")
    score.add_argument("--alignment", help="per-utterance alignment file (default: beside --hyp)")
    score.add_argument("--worst", type=int, default=10, help="list this many worst utterances")
    score.add_argument("--json", action="store_true", help="one JSON object on stdout")
    score.add_argument(
        "--by-speaker",
        metavar="TRAIN_MANIFEST",
        help="also WER per speaker group: seen or unseen in this training manifest, by the "
        "speaker name's prefix before ':' (the built-in corpus: espeak, festival)",
    )
    score.set_defaults(run=run_score)


def run_score(args: argparse.Namespace) -> None:
    from echoic.decode.context import read_hotwords
    from echoic.score import group_rates, score_files, speaker_groups

    hotwords = [h.phrase for h in read_hotwords(args.hotwords)] if args.hotwords else None
    report = score_files(
        args.ref,
        args.hyp,
        lowercase=args.lowercase,
        remove_punctuation=args.remove_punctuation,
        hotwords=hotwords,
        alignment=args.alignment,
    )
    result = report.to_dict(worst=args.worst)
    if args.by_speaker:
        result["by_speaker"] = group_rates(report, speaker_groups(args.ref, args.by_speaker))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "worst"}))
        return
    w = report.words
    print(
        f"WER {100 * w.rate:.2f}% (S={w.sub} D={w.dele} I={w.ins} / {w.ref} words)  "
        f"CER {100 * report.chars.rate:.2f}%  "
        f"{report.utterances} utterances"
    )
    if report.missing:
        print(
            f"  {len(report.missing)} utterances had no hypothesis (scored as deletions), "
            f"e.g. {report.missing[0]}"
        )
    if report.hotwords:
        h = report.hotwords
        fmt = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        print(
            f"hotwords: recall {fmt(h['recall'])} precision {fmt(h['precision'])}  "
            f"B-WER {fmt(h['b_wer'])} U-WER {fmt(h['u_wer'])}"
        )
    for group, rates in result.get("by_speaker", {}).items():
        print(
            f"  {group}: WER {100 * rates['wer']:.2f}% ({rates['utterances']} utterances, "
            f"{rates['ref_words']} words)"
        )
    for utt in result["worst"]:
        print(f"  {utt['id']}: {utt['errors']} errors in {utt['ref_words']} words")
