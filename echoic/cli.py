"""The `echoic` command. Each subcommand parses its flags and calls one library function.

A user-fixable problem (`EchoicError`) is printed as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from echoic import __version__
from echoic.errors import EchoicError

log = logging.getLogger("echoic")


def _synth(args: argparse.Namespace) -> None:
    from echoic.data.synth.corpus import synthesize_corpus
    from echoic.data.synth.degraded import write_degraded_tests

    start = time.perf_counter()
    if args.degraded_only:
        counts = write_degraded_tests(args.out, seed=args.seed)
        elapsed = time.perf_counter() - start
        print(
            f"wrote {', '.join(f'{k}.jsonl ({n})' for k, n in counts.items())} in {elapsed:.1f} s"
        )
        return
    summary = synthesize_corpus(
        args.out,
        lang=args.lang,
        num_utts=args.num_utts,
        seed=args.seed,
        noise_snr=args.noise_snr,
        jobs=args.jobs,
        hotword_test=args.hotword_utts if args.hotword_test else 0,
        progress=not args.no_progress,
        domain=args.domain,
    )
    elapsed = time.perf_counter() - start
    splits = summary["splits"]
    counts = ", ".join(
        f"{name} {s['utterances']} ({s['hours']:.2f} h)" for name, s in splits.items()
    )
    unit = "chars" if args.lang == "zh" else "words"
    print(f"wrote {args.out}: {counts} in {elapsed:.1f} s")
    print(
        f"train has {splits['train'][f'distinct_{unit}']} distinct {unit}; "
        f"{len(summary['voices'])} voices, {len(summary['test_only_voices'])} heard only in "
        "test and test_open"
    )
    # What the held-out splits ask of the vocabulary: dev and test are drawn to avoid
    # train's unseen words, test_open is not.
    held_out = [name for name in splits if name != "train"]
    unseen = (splits[n][f"unseen_{unit}"] / max(1, splits[n][f"running_{unit}"]) for n in held_out)
    print(
        f"{unit} train never has: "
        + ", ".join(f"{name} {rate:.1%}" for name, rate in zip(held_out, unseen))
        + f"; {unit} per utterance: "
        + ", ".join(f"{name} {s[f'{unit}_per_utterance']:.2f}" for name, s in splits.items())
    )
    text = summary["lm_text"]
    print(
        f"lm_text.txt: {text['sentences']} sentences for a language model "
        f"(train's and {text['text_only']} that no split speaks)"
    )


def _import(args: argparse.Namespace) -> None:
    from echoic.data.importers import import_corpus
    from echoic.data.manifest import write_manifest

    utterances = import_corpus(args.format, args.source, normalize=args.normalize, lang=args.lang)
    count = write_manifest(args.out, utterances)
    hours = sum(u.duration for u in utterances) / 3600
    print(f"wrote {count} utterances ({hours:.2f} h) to {args.out}")


def _prepare(args: argparse.Namespace) -> None:
    from echoic.data.features import FbankConfig
    from echoic.data.prepare import prepare

    report = prepare(
        args.manifest,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        character_coverage=args.character_coverage,
        sample_rate=args.sample_rate,
        fbank=FbankConfig(num_mel_bins=args.num_mel_bins),
        report_on=args.report_on,
        jobs=args.jobs,
        progress=not args.no_progress,
    )
    print(
        f"wrote {args.out}: {report['tokenizer']} tokenizer with {report['vocab_size']} tokens, "
        f"CMVN over {report['cmvn_hours']:.2f} h"
    )
    for entry in report["unknown"]:
        top = json.dumps(entry["top_unknown"], ensure_ascii=False) if entry["top_unknown"] else ""
        print(
            f"  {entry['manifest']}: {entry['unknown_chars']} of {entry['tokens']} tokens "
            f"map to <unk> ({100 * entry['unknown_rate']:.2f}%) {top}".rstrip()
        )


def _kmeans(args: argparse.Namespace) -> None:
    from echoic.pretrain.units import kmeans_units

    result = kmeans_units(
        args.manifest,
        args.out,
        features=args.features,
        k=args.k,
        seed=args.seed,
        sample_fraction=args.sample_fraction,
        max_sample_frames=args.max_sample_frames,
        backend=args.backend,
        jobs=args.jobs or os.cpu_count() or 1,
        align_exp=args.align_exp,
        align_max_utts=args.align_max_utts,
        progress=not args.no_progress,
    )
    report = result.report
    print(
        f"k-means ({report['backend']}, K={report['k']}) on {report['sample_frames']} frames of "
        f"{report['features']}: fit {report['fit_seconds']:.1f} s, inertia "
        f"{report['sample_inertia']:.3f}"
    )
    for name, stats in report["manifests"].items():
        skipped = sum(stats["skipped"].values())
        print(
            f"  {args.out}/{name}: {stats['utterances']} utterances ({skipped} skipped), "
            f"{stats['frames']} frames, {stats['clusters_used']}/{report['k']} clusters used, "
            f"label perplexity {stats['perplexity']:.1f} (uniform {report['k']}), largest "
            f"cluster {100 * stats['largest_cluster_share']:.1f}%"
        )
        agreement = stats.get("agreement")
        if agreement:
            print(
                f"    against characters ({agreement['utterances']} utterances aligned): cluster "
                f"purity {agreement['cluster_purity']:.3f}, character purity "
                f"{agreement['char_purity']:.3f}, char-NMI {agreement['char_nmi']:.3f}"
            )


def _train(args: argparse.Namespace) -> int:
    from echoic.train.config import load_experiment
    from echoic.train.trainer import Trainer

    config = load_experiment(args.config, args.set)
    trainer = Trainer(
        config,
        args.exp,
        resume=args.resume,
        allow_config_change=args.allow_config_change,
        progress=not args.no_progress,
    )
    return trainer.run()


def _average(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    from echoic.train.checkpoint import average_weights, list_checkpoints
    from echoic.train.metrics import read_metrics

    directory = Path(args.exp) / "checkpoints"
    paths = list_checkpoints(directory)
    if args.best:
        dev = [
            r
            for r in read_metrics(Path(args.exp) / "metrics.jsonl")
            if r["split"] == "dev" and r.get(args.metric) is not None
        ]
        ranked = sorted(dev, key=lambda r: r[args.metric], reverse=args.mode == "max")
        saved = {int(p.name.split("-")[1]): p for p in paths}
        # One entry per step: a step may have more than one dev line (older runs
        # validated an epoch's last step twice), and its checkpoint counts once.
        steps = dict.fromkeys(r["step"] for r in ranked if r["step"] in saved)
        chosen = [saved[step] for step in steps][: args.best]
        what = f"best-{args.best}"
    else:
        chosen = paths[-args.last :]
        what = f"last-{args.last}"
    if not chosen:
        raise EchoicError(f"no checkpoints to average in {directory}")
    out = Path(args.out) if args.out else Path(args.exp) / f"average-{what}.safetensors"
    save_file(average_weights(chosen), out)
    print(f"averaged {len(chosen)} checkpoints ({', '.join(p.name for p in chosen)}) into {out}")


def _plot(args: argparse.Namespace) -> None:
    from echoic.train.plot import plot_curves

    print(f"wrote {plot_curves(args.exp, args.out)}")


def _search_options(args: argparse.Namespace, method: str):
    """DecodeOptions from the search flags `_add_search_arguments` declares."""
    from echoic.decode.decoder import DecodeOptions

    return DecodeOptions(
        method=method,
        beam=args.beam,
        ctc_weight=args.ctc_weight,
        attention_weight=args.attention_weight,
        reverse_weight=args.reverse_weight,
        length_penalty=args.length_penalty,
        max_symbols_per_frame=args.max_symbols,
    )


def _scorer_settings(args: argparse.Namespace):
    """The hotword and word-LM flags, as decode and transcribe take them."""
    from echoic.decode.decoder import ScorerSettings

    return ScorerSettings(
        hotwords=args.hotwords,
        hotword_boost=args.hotword_boost,
        lm=args.lm,
        lm_weight=args.lm_weight,
        word_bonus=args.word_bonus,
    )


def _decode(args: argparse.Namespace) -> None:
    from echoic.decode.run import decode_manifest

    summary = decode_manifest(
        args.exp,
        args.manifest,
        args.out,
        _search_options(args, args.method),
        scorer=_scorer_settings(args),
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


def _export(args: argparse.Namespace) -> None:
    from echoic.decode.decoder import load_experiment_model
    from echoic.decode.export import export_info, export_model, quantize_onnx, write_export_info

    model, _, _ = load_experiment_model(
        args.exp, checkpoint=args.checkpoint, average_last=args.average_last
    )
    out = Path(args.out) if args.out else Path(args.exp) / "export"
    if args.format == "hf":
        save = getattr(model, "save_huggingface", None)
        if save is None:
            raise EchoicError("--format hf exports a HuBERT model (model.hubert); use onnx")
        print("wrote " + ", ".join(str(p) for p in save(out)))
        return
    path = export_model(model, out, args.format)
    written = [path]
    if args.format == "onnx" and not args.no_quantize:
        written.append(quantize_onnx(path))
    write_export_info(out, export_info(model, args.format, written))
    print("wrote " + ", ".join(str(p) for p in written))


def _transcribe(args: argparse.Namespace) -> None:
    from echoic.decode.segment import SegmentOptions
    from echoic.decode.transcribe import transcribe

    segmentation = None if args.no_segment else SegmentOptions(max_segment=args.max_segment)
    segment_stream = open(args.segment_output, "w") if args.segment_output else None  # noqa: SIM115
    try:
        for result in transcribe(
            args.exp,
            args.audio,
            method=args.method,
            options=_search_options(args, args.method or ""),
            checkpoint=args.checkpoint,
            scorer=_scorer_settings(args),
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


def _score(args: argparse.Namespace) -> None:
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


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The search settings decode and transcribe share: same flags, same defaults."""
    parser.add_argument("--beam", type=int, default=10)
    parser.add_argument("--ctc-weight", type=float, default=0.5, help="attention_rescoring")
    parser.add_argument(
        "--attention-weight",
        type=float,
        default=1.0,
        help="attention_rescoring; with --lm, 0.25 and --ctc-weight 0.5 were best on dev",
    )
    parser.add_argument(
        "--reverse-weight", type=float, default=0.0, help="attention_rescoring, right-to-left"
    )
    parser.add_argument("--length-penalty", type=float, default=1.0, help="attention")
    parser.add_argument("--max-symbols", type=int, default=3, help="rnnt: tokens per frame at most")
    parser.add_argument(
        "--hotwords",
        help="file: one phrase per line, optional TAB boost; a context graph for the prefix "
        "searches, the hotword list of a contextual or SeACo-Paraformer for paraformer "
        "(which uses no boost)",
    )
    parser.add_argument("--hotword-boost", type=float, default=None, help="default boost per token")
    parser.add_argument(
        "--lm", help="word LM (character models): a text file or manifest whose sentences it learns"
    )
    parser.add_argument("--lm-weight", type=float, help="with --lm (default 0.4)")
    parser.add_argument("--word-bonus", type=float, help="with --lm: score per word (default 1.5)")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echoic", description="End-to-end speech recognition.")
    parser.add_argument("--version", action="version", version=f"echoic {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser(
        "synth",
        help="synthesize the built-in speech corpus",
        description="Synthesize a deterministic speech corpus (16 kHz wav + train/dev/test "
        "manifests) from real sentences with espeak-ng and festival, and lm_text.txt: the "
        "train transcripts plus the sentences no split speaks, for `echoic decode --lm`. "
        "Dev and test sentences use train's words where the pool allows; test_open.jsonl "
        "(2.5% of --num-utts more) is drawn without that rule. No held-out sentence shares "
        "5 words in a row with train or lm_text.txt.",
    )
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--lang", choices=["en", "zh"], default="en", help="English or Mandarin")
    synth.add_argument(
        "--domain",
        choices=["demo", "shifted"],
        default="demo",
        help="demo: the built-in corpus; shifted (English only): other fortune files' "
        "sentences, none in the demo's, and espeak-ng voices the demo never uses, for "
        "fine-tuning experiments",
    )
    synth.add_argument(
        "--num-utts", type=int, default=2000, help="utterances in train, dev and test"
    )
    synth.add_argument("--seed", type=int, default=0, help="same seed, byte-identical corpus")
    synth.add_argument(
        "--noise-snr", type=float, default=None, metavar="DB", help="add noise at this SNR"
    )
    synth.add_argument(
        "--jobs", type=int, default=None, help="parallel processes (default: all cores)"
    )
    synth.add_argument(
        "--hotword-test",
        action="store_true",
        help="also hotword_test.jsonl: sentences with rare words absent from train, "
        "listed in hotwords.txt with as many distractors",
    )
    synth.add_argument("--hotword-utts", type=int, default=100, help="size of the hotword test set")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.add_argument(
        "--degraded-only",
        action="store_true",
        help="only add the noisy and telephone copies of test and dev (test_noisy.jsonl, "
        "test_tel.jsonl, dev_noisy.jsonl, dev_tel.jsonl; every synth writes them) to the "
        "existing corpus in --out",
    )
    synth.set_defaults(run=_synth)

    importer = commands.add_parser(
        "import",
        help="convert a corpus to an echoic manifest",
        description="Convert a Kaldi data dir, a LibriSpeech-style tree, a folder of audio + .txt "
        "files, a lhotse CutSet, or a MUSAN-style tree of noise recordings (for "
        "data.augment.noise.files) into an echoic JSONL manifest.",
    )
    importer.add_argument(
        "--format", required=True, choices=["kaldi", "librispeech", "folder", "lhotse", "musan"]
    )
    importer.add_argument("source", help="data dir, tree root, folder, or CutSet file")
    importer.add_argument("--out", required=True, help="manifest to write (.jsonl)")
    importer.add_argument(
        "--normalize", action="store_true", help="lower-case, strip punctuation, spell numbers"
    )
    importer.add_argument(
        "--lang", default=None, help="language tag for every utterance (e.g. en, zh)"
    )
    importer.set_defaults(run=_import)

    prep = commands.add_parser(
        "prepare",
        help="train a tokenizer and compute CMVN statistics",
        description="Train a char or BPE tokenizer on a manifest's transcripts and compute global "
        "CMVN statistics of its fbank features.",
    )
    prep.add_argument("--manifest", required=True, help="training manifest")
    prep.add_argument("--tokenizer", choices=["char", "bpe"], default="char")
    prep.add_argument("--vocab-size", type=int, default=500, help="BPE: total ids incl. specials")
    prep.add_argument(
        "--character-coverage", type=float, default=1.0, help="BPE: sentencepiece coverage"
    )
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument(
        "--report-on", nargs="*", default=[], metavar="MANIFEST", help="also report <unk> rates"
    )
    prep.add_argument("--sample-rate", type=int, default=16000)
    prep.add_argument("--num-mel-bins", type=int, default=80)
    prep.add_argument(
        "--jobs", type=int, default=None, help="parallel processes (default: all cores)"
    )
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(run=_prepare)

    kmeans = commands.add_parser(
        "kmeans",
        help="frame-level k-means labels: HuBERT's pretraining targets",
        description="Fit k-means (scikit-learn or faiss) on a sample of the first manifest's "
        "20 ms frames and label every manifest's frames with the nearest centroid. OUT is "
        "a data.lang folder (tokenizer.json of kind units) holding each manifest with its "
        "text replaced by the labels, centroids.safetensors and report.json (cluster "
        "usage, label perplexity).",
    )
    kmeans.add_argument(
        "--manifest", required=True, action="append", help="manifest (repeat: the first is fit on)"
    )
    kmeans.add_argument(
        "--features",
        default="mfcc",
        help="mfcc (39-dim, iteration 1) or ssl:PATH:LAYER (a HuggingFace folder's hidden state)",
    )
    kmeans.add_argument("--k", type=int, default=100, help="clusters")
    kmeans.add_argument("--out", required=True, help="output folder")
    kmeans.add_argument("--seed", type=int, default=0)
    kmeans.add_argument(
        "--sample-fraction", type=float, default=0.1, help="share of utterances fit on"
    )
    kmeans.add_argument("--max-sample-frames", type=int, default=300_000)
    kmeans.add_argument("--backend", choices=["sklearn", "faiss"], default="sklearn")
    kmeans.add_argument("--jobs", type=int, default=None, help="processes (default: all cores)")
    kmeans.add_argument(
        "--align-exp",
        help="a CTC model's experiment folder: also report how the labels agree with the "
        "characters of each manifest (forced alignment of its transcripts)",
    )
    kmeans.add_argument("--align-max-utts", type=int, default=300, help="utterances aligned")
    kmeans.add_argument("--no-progress", action="store_true", help="no progress bar")
    kmeans.set_defaults(run=_kmeans)

    train = commands.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from a YAML config (sections data, model, optim, train) into an "
        "experiment folder; rerunning the same command continues from the newest valid "
        "checkpoint, exactly. Under torchrun it trains with DDP or FSDP2.",
    )
    train.add_argument("config", help="experiment YAML")
    train.add_argument(
        "--exp", required=True, help="experiment folder (checkpoints, metrics, logs)"
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    train.add_argument(
        "--resume",
        default="auto",
        help="auto (newest valid checkpoint), none, or a checkpoint folder",
    )
    train.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even if the change breaks exactness",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)

    average = commands.add_parser(
        "average",
        help="average checkpoint weights",
        description="Average the weights of the last or best K checkpoints.",
    )
    average.add_argument("--exp", required=True)
    which = average.add_mutually_exclusive_group(required=True)
    which.add_argument("--last", type=int, help="the newest K checkpoints")
    which.add_argument("--best", type=int, help="the K checkpoints with the best dev metric")
    average.add_argument("--metric", default="loss", help="dev metric for --best")
    average.add_argument(
        "--mode", choices=["min", "max"], default="min", help="is smaller or larger better"
    )
    average.add_argument("--out", help="output .safetensors (default: in the experiment folder)")
    average.set_defaults(run=_average)

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
    decode.add_argument("--exp", required=True, help="experiment folder")
    decode.add_argument("--manifest", required=True)
    decode.add_argument(
        "--method",
        required=True,
        help="ctc_greedy, ctc_prefix_beam, attention, attention_rescoring, rnnt_greedy, "
        "rnnt_beam or paraformer (those the model's heads allow)",
    )
    decode.add_argument("--out", required=True, help="output folder")
    _add_search_arguments(decode)
    decode.add_argument(
        "--checkpoint", help="a checkpoint folder or .safetensors (default: newest)"
    )
    decode.add_argument("--average-last", type=int, help="average the last K checkpoints")
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
    decode.add_argument("--no-progress", action="store_true")
    decode.set_defaults(run=_decode)

    export = commands.add_parser(
        "export",
        help="export the encoder + CTC path (ONNX, TorchScript)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=EXPORT_DESCRIPTION,
    )
    export.add_argument("--exp", required=True)
    export.add_argument(
        "--format",
        choices=["onnx", "torchscript", "hf"],
        required=True,
        help="hf: a HuBERT model's backbone as a HuggingFace folder (for the ssl frontend)",
    )
    export.add_argument("--out", help="output folder (default: EXP/export)")
    export.add_argument("--no-quantize", action="store_true", help="ONNX: skip the int8 copy")
    export.add_argument(
        "--checkpoint", help="a checkpoint folder or .safetensors (default: newest)"
    )
    export.add_argument("--average-last", type=int, help="average the last K checkpoints")
    export.set_defaults(run=_export)

    transcribe = commands.add_parser(
        "transcribe",
        help="print the transcript of audio files",
        description="Transcribe audio files (any format soundfile reads, any rate, any channels). "
        "Recordings of more than one utterance are cut at their pauses by a voice-activity "
        "detector and decoded in pieces.",
    )
    transcribe.add_argument("--exp", required=True, help="experiment folder")
    transcribe.add_argument("audio", nargs="+", help="audio files")
    transcribe.add_argument("--method", help="decoding method (default: the best the model has)")
    _add_search_arguments(transcribe)
    transcribe.add_argument(
        "--checkpoint", help="a checkpoint folder or .safetensors (default: newest)"
    )
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
    transcribe.set_defaults(run=_transcribe)

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
    score.set_defaults(run=_score)

    plot = commands.add_parser(
        "plot",
        help="draw training curves",
        description="Draw loss, accuracy and learning-rate curves.",
    )
    plot.add_argument("--exp", required=True)
    plot.add_argument("--out", help="PNG to write (default: EXP/curves.png)")
    plot.set_defaults(run=_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        code = args.run(args)
    except EchoicError as error:
        print(f"echoic: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("echoic: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`echoic score ... | head`): not an error worth a traceback.
        # Point stdout at /dev/null so that flushing it at exit cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code or 0
