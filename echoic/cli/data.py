"""The data commands: synth, import, prepare and kmeans, each parser beside its handler.

They make and prepare corpora: synthesize the built-in one, import others as manifests,
train a tokenizer with CMVN statistics, and label frames with k-means units for HuBERT.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from echoic.cli.options import add_jobs_option, add_no_progress_option


def add_synth_parser(commands: argparse._SubParsersAction) -> None:
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
    add_jobs_option(synth)
    synth.add_argument(
        "--hotword-test",
        action="store_true",
        help="also hotword_test.jsonl: sentences with rare words absent from train, "
        "listed in hotwords.txt with as many distractors",
    )
    synth.add_argument("--hotword-utts", type=int, default=100, help="size of the hotword test set")
    add_no_progress_option(synth)
    synth.add_argument(
        "--degraded-only",
        action="store_true",
        help="only add the noisy and telephone copies of test and dev (test_noisy.jsonl, "
        "test_tel.jsonl, dev_noisy.jsonl, dev_tel.jsonl; every synth writes them) to the "
        "existing corpus in --out",
    )
    synth.set_defaults(run=run_synth)


def run_synth(args: argparse.Namespace) -> None:
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


def add_import_parser(commands: argparse._SubParsersAction) -> None:
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
    importer.set_defaults(run=run_import)


def run_import(args: argparse.Namespace) -> None:
    from echoic.data.importers import import_corpus
    from echoic.data.manifest import write_manifest

    utterances = import_corpus(args.format, args.source, normalize=args.normalize, lang=args.lang)
    count = write_manifest(args.out, utterances)
    hours = sum(u.duration for u in utterances) / 3600
    print(f"wrote {count} utterances ({hours:.2f} h) to {args.out}")


def add_prepare_parser(commands: argparse._SubParsersAction) -> None:
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
    add_jobs_option(prep)
    add_no_progress_option(prep)
    prep.set_defaults(run=run_prepare)


def run_prepare(args: argparse.Namespace) -> None:
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


def add_kmeans_parser(commands: argparse._SubParsersAction) -> None:
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
    add_jobs_option(kmeans, help="processes (default: all cores)")
    kmeans.add_argument(
        "--align-exp",
        help="a CTC model's experiment folder: also report how the labels agree with the "
        "characters of each manifest (forced alignment of its transcripts)",
    )
    kmeans.add_argument("--align-max-utts", type=int, default=300, help="utterances aligned")
    add_no_progress_option(kmeans)
    kmeans.set_defaults(run=run_kmeans)


def run_kmeans(args: argparse.Namespace) -> None:
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
