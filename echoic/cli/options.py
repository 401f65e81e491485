"""The flags several commands take, each group defined once, with the code that reads it.

Every function adds its flags to a subcommand's parser at the point it is called, so a
command's `--help` lists them where it always has. Where commands word a shared flag's
help differently, the caller passes its own `help` (None: no help text).
"""

from __future__ import annotations

import argparse

NO_PROGRESS_HELP = "no progress bar"
ALL_CORES_HELP = "parallel processes (default: all cores)"


def add_exp_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """--exp: the experiment folder a command trains into or reads a model from."""
    parser.add_argument("--exp", required=True, help=help)


def add_jobs_option(parser: argparse.ArgumentParser, help: str = ALL_CORES_HELP) -> None:
    """--jobs: worker processes; None (the default) leaves the choice to the command."""
    parser.add_argument("--jobs", type=int, default=None, help=help)


def add_no_progress_option(
    parser: argparse.ArgumentParser, help: str | None = NO_PROGRESS_HELP
) -> None:
    """--no-progress: the command reads it as `progress=not args.no_progress`."""
    parser.add_argument("--no-progress", action="store_true", help=help)


def add_checkpoint_options(parser: argparse.ArgumentParser, average_last: bool = True) -> None:
    """--checkpoint and, unless average_last is False, --average-last: which weights to load."""
    parser.add_argument(
        "--checkpoint", help="a checkpoint folder or .safetensors (default: newest)"
    )
    if average_last:
        parser.add_argument("--average-last", type=int, help="average the last K checkpoints")


def add_search_options(parser: argparse.ArgumentParser) -> None:
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


def search_options(args: argparse.Namespace, method: str):
    """DecodeOptions from the flags `add_search_options` declares."""
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


def add_scorer_options(parser: argparse.ArgumentParser) -> None:
    """The hotword and word-LM flags decode and transcribe share."""
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


def scorer_settings(args: argparse.Namespace):
    """ScorerSettings from the flags `add_scorer_options` declares."""
    from echoic.decode.decoder import ScorerSettings

    return ScorerSettings(
        hotwords=args.hotwords,
        hotword_boost=args.hotword_boost,
        lm=args.lm,
        lm_weight=args.lm_weight,
        word_bonus=args.word_bonus,
    )


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """Search settings, then hotwords and the word LM: the order `--help` lists them in."""
    add_search_options(parser)
    add_scorer_options(parser)
