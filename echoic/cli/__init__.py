"""The `echoic` command: builds its parser from the command groups' and runs one command.

Each subcommand parses its flags and calls one library function; its parser sits beside
its handler in echoic.cli.data, .train or .decode, the flags several share in .options.
A user-fixable problem (`EchoicError`) is printed as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from echoic import __version__
from echoic.cli import data, decode, train
from echoic.errors import EchoicError

# Every command's parser, in the order `echoic --help` lists them.
COMMANDS = (
    data.add_synth_parser,
    data.add_import_parser,
    data.add_prepare_parser,
    data.add_kmeans_parser,
    train.add_train_parser,
    train.add_average_parser,
    decode.add_decode_parser,
    decode.add_export_parser,
    decode.add_transcribe_parser,
    decode.add_score_parser,
    train.add_plot_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echoic", description="End-to-end speech recognition.")
    parser.add_argument("--version", action="version", version=f"echoic {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in COMMANDS:
        add_parser(commands)
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


__all__ = ["build_parser", "main"]
