"""The experiment folder, in one place: its layout, where a run resumes, whether a
changed config keeps resume exact, which checkpoint is best, and loading its model.

    EXP/config.yaml        the resolved config (every default written out)
    EXP/tokenizer.json     copied from data.lang when the run starts, kept on resume
    EXP/cmvn.json          likewise, for a model that normalises with global CMVN
    EXP/checkpoints/step-N model.safetensors + state.pt + checksums (echoic.train.checkpoint)
    EXP/metrics.jsonl      train, dev, probe and system lines (echoic.train.metrics)
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml
from safetensors.torch import load_file

from echoic.data.tokenizer import Tokenizer, load_tokenizer
from echoic.errors import ConfigError, EchoicError
from echoic.models.contract import TrainableModel
from echoic.models.model import build_model
from echoic.train import checkpoint as ckpt
from echoic.train.config import (
    ExperimentConfig,
    breaking_changes,
    config_differences,
    dump_experiment,
    parse_experiment,
)

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
CMVN = "cmvn.json"


def resume_point(exp_dir: Path, resume: str) -> Path | None:
    """The checkpoint a run continues from: `auto` the newest valid one (None for a new
    run), `none` none (refused when there are checkpoints), else the folder named."""
    directory = exp_dir / "checkpoints"
    if resume == "none":
        if ckpt.list_checkpoints(directory):
            raise EchoicError(
                f"{exp_dir} already has checkpoints: use --resume auto, or another --exp"
            )
        return None
    if resume == "auto":
        return ckpt.newest_valid(directory)
    path = Path(resume)
    if not path.is_dir():
        raise EchoicError(f"checkpoint to resume from not found: {path}")
    return path


def check_config_change(
    exp_dir: Path,
    config: ExperimentConfig,
    saved_global_accum: int,
    world_size: int,
    *,
    allow: bool,
) -> None:
    """On resume: warn about config changes, refuse those that break exactness."""
    saved = exp_dir / CONFIG
    if not saved.is_file():
        return
    try:
        old = parse_experiment(yaml.safe_load(saved.read_text()) or {}, where=str(saved))
    except ConfigError as error:
        raise EchoicError(f"cannot compare with the run's saved config: {error}") from None
    changes = [f"{key}: {a!r} -> {b!r}" for key, a, b in config_differences(old, config)]
    # accum_grad may change with the number of processes: their product is what counts.
    breaking = breaking_changes(old, config)
    breaking.pop("train.accum_grad", None)
    global_accum = config.train.accum_grad * world_size
    if global_accum != saved_global_accum:
        breaking["accum_grad x processes"] = ""
        changes.append(f"accum_grad x processes: {saved_global_accum!r} -> {global_accum!r}")
    listed = "; ".join(changes)
    if breaking and not allow:
        keys = "; ".join(f"{key}, {why}" if why else key for key, why in breaking.items())
        raise ConfigError(
            f"the config changed in ways that break exact resume ({keys}); "
            f"pass --allow-config-change to resume anyway. Changes: {listed}"
        )
    if changes:
        log.warning("resuming with a changed config: %s", listed)


def prepare(exp_dir: Path, config: ExperimentConfig, *, resuming: bool) -> None:
    """Copy the tokenizer and CMVN statistics from data.lang (a resumed run keeps the
    ones it started with). The config is written once the model is built and any
    checkpoint loaded (`write_config`), so a run refused before that leaves the folder's
    config as it was."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    lang = Path(config.data.lang)
    for name, needed in ((TOKENIZER, True), (CMVN, config.model.wants_cmvn)):
        target = exp_dir / name
        if resuming and target.is_file():
            continue  # the run keeps the tokenizer and statistics it started with
        if not (lang / name).is_file():
            if needed:
                raise EchoicError(
                    f"{lang / name} not found: run `echoic prepare --out {lang}` first"
                )
            continue
        shutil.copyfile(lang / name, target)


def write_config(exp_dir: Path, config: ExperimentConfig) -> None:
    """The run's resolved config, every default written out (what a resume compares with)."""
    (exp_dir / CONFIG).write_text(dump_experiment(config))


def check_weights_fit(model: TrainableModel, weights: dict, checkpoint: Path) -> None:
    """Refuse, in one line, a checkpoint whose weights do not fit the model the config
    builds now: a resume after --allow-config-change changed the architecture."""
    expected = model.state_dict()
    mismatched = [
        f"{key} {list(weights[key].shape)} in the checkpoint, {list(value.shape)} now"
        for key, value in expected.items()
        if key in weights and weights[key].shape != value.shape
    ]
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    if not (mismatched or missing or unexpected):
        return
    found = [
        f"{len(found)} {what} (first {found[0]})"
        for what, found in (("of other shape", mismatched), ("missing", missing),
                            ("unexpected", unexpected))
        if found
    ]  # fmt: skip
    raise EchoicError(
        f"{checkpoint}: its weights do not fit the model the config builds now "
        f"({'; '.join(found)}): a resume cannot change the architecture, even with "
        "--allow-config-change. Train into a new --exp, with `init: {checkpoint: ...}` "
        "to start from these weights"
    )


def best_or_newest(exp_dir: Path, where: str) -> tuple[Path, str]:
    """The checkpoint with the best dev result that is still kept, else the newest valid
    one, and how it was chosen. `where` names the caller's setting, for errors."""
    directory = exp_dir / "checkpoints"
    newest = ckpt.newest_valid(directory)
    if newest is None:
        raise EchoicError(f"{where} {exp_dir}: no valid checkpoint in {directory}")
    _, state = ckpt.load_checkpoint(newest)
    for value, step in state.get("best", []):
        candidate = directory / ckpt.checkpoint_name(int(step))
        if candidate.is_dir() and ckpt.verify(candidate) is None:
            return candidate, f"best dev value {value:.4g} at step {int(step)}"
    return newest, "newest: no kept checkpoint has a dev result"


def load_experiment_model(
    exp_dir: str | Path, *, checkpoint: str | None = None, average_last: int | None = None
) -> tuple[TrainableModel, Tokenizer, ExperimentConfig]:
    """The model of an experiment folder, in eval mode: the newest checkpoint, a given
    checkpoint folder or .safetensors file, or the average of the last K checkpoints."""
    exp_dir = Path(exp_dir)
    config_path = exp_dir / CONFIG
    if not config_path.is_file():
        raise EchoicError(
            f"{exp_dir} is not an experiment folder (no config.yaml): train one with `echoic train`"
        )
    try:
        config = parse_experiment(
            yaml.safe_load(config_path.read_text()) or {}, where=str(config_path)
        )
    except ConfigError as error:
        raise EchoicError(str(error)) from None
    tokenizer = load_tokenizer(exp_dir / TOKENIZER)
    model = build_model(config.model, tokenizer.vocab_size)
    checkpoints = ckpt.list_checkpoints(exp_dir / "checkpoints")
    if average_last:
        if len(checkpoints) < average_last:
            raise EchoicError(
                f"--average-last {average_last}: {exp_dir} has {len(checkpoints)} checkpoints"
            )
        weights = ckpt.average_weights(checkpoints[-average_last:])
    elif checkpoint:
        path = Path(checkpoint)
        if path.is_dir():
            weights, _ = ckpt.load_checkpoint(path)
        elif path.is_file():
            weights = load_file(path)
        else:
            raise EchoicError(f"checkpoint not found: {path}")
    else:
        if not checkpoints:
            raise EchoicError(f"{exp_dir} has no checkpoints yet")
        weights, _ = ckpt.load_checkpoint(checkpoints[-1])
    model.load_state_dict(weights, strict=True)
    return model.eval(), tokenizer, config
