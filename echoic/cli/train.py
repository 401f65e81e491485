"""The training commands: train, average and plot, each parser beside its handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from echoic.cli.options import add_exp_option, add_no_progress_option
from echoic.errors import EchoicError


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from a YAML config (sections data, model, optim, train) into an "
        "experiment folder; rerunning the same command continues from the newest valid "
        "checkpoint, exactly. Under torchrun it trains with DDP or FSDP2.",
    )
    train.add_argument("config", help="experiment YAML")
    add_exp_option(train, help="experiment folder (checkpoints, metrics, logs)")
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
    add_no_progress_option(train)
    train.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
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


def add_average_parser(commands: argparse._SubParsersAction) -> None:
    average = commands.add_parser(
        "average",
        help="average checkpoint weights",
        description="Average the weights of the last or best K checkpoints.",
    )
    add_exp_option(average)
    which = average.add_mutually_exclusive_group(required=True)
    which.add_argument("--last", type=int, help="the newest K checkpoints")
    which.add_argument("--best", type=int, help="the K checkpoints with the best dev metric")
    average.add_argument("--metric", default="loss", help="dev metric for --best")
    average.add_argument(
        "--mode", choices=["min", "max"], default="min", help="is smaller or larger better"
    )
    average.add_argument("--out", help="output .safetensors (default: in the experiment folder)")
    average.set_defaults(run=run_average)


def run_average(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    from echoic.train.checkpoint import average_weights, list_checkpoints
    from echoic.train.metrics import read_metrics

    directory = Path(args.exp) / "checkpoints"
    paths = list_checkpoints(directory)
    if args.best:
        lines = [r for r in read_metrics(Path(args.exp) / "metrics.jsonl") if r["split"] == "dev"]
        if not lines:
            raise EchoicError(
                f"--best needs dev results, and {args.exp}/metrics.jsonl has none "
                "(train with data.dev); use --last"
            )
        dev = [r for r in lines if r.get(args.metric) is not None]
        if not dev:
            recorded = sorted({k for r in lines for k, v in r.items() if isinstance(v, float)})
            raise EchoicError(
                f"--metric {args.metric}: this run's dev results have no such metric; "
                f"they record {', '.join(recorded)}"
            )
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
    if not chosen and args.best:
        raise EchoicError(
            f"none of the checkpoints with a dev result is kept in {directory} "
            f"({len(paths)} kept: {', '.join(p.name for p in paths) or 'none'}); use --last"
        )
    if not chosen:
        raise EchoicError(f"no checkpoints to average in {directory}")
    out = Path(args.out) if args.out else Path(args.exp) / f"average-{what}.safetensors"
    save_file(average_weights(chosen), out)
    print(f"averaged {len(chosen)} checkpoints ({', '.join(p.name for p in chosen)}) into {out}")


def add_plot_parser(commands: argparse._SubParsersAction) -> None:
    plot = commands.add_parser(
        "plot",
        help="draw training curves",
        description="Draw loss, accuracy and learning-rate curves.",
    )
    add_exp_option(plot)
    plot.add_argument("--out", help="PNG to write (default: EXP/curves.png)")
    plot.set_defaults(run=run_plot)


def run_plot(args: argparse.Namespace) -> None:
    from echoic.train.plot import plot_curves

    print(f"wrote {plot_curves(args.exp, args.out)}")
