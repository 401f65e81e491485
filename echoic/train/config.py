"""The experiment config: `data`, `model`, `optim` and `train` sections of one YAML file.

Every key is checked against these dataclasses (see echoic.config): an unknown or
mistyped key is a one-line error naming the key, its section and the allowed keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from echoic.config import apply_overrides, from_dict, load_yaml, to_dict
from echoic.data.dataset import DataConfig
from echoic.errors import ConfigError
from echoic.models.model import ModelConfig
from echoic.train.probe import ProbeConfig


@dataclass(frozen=True, kw_only=True)
class DataSection(DataConfig):
    train: str  # training manifest (JSONL)
    dev: str | None = None  # validation manifest
    lang: str  # folder written by `echoic prepare`: tokenizer.json and cmvn.json


@dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: float = 1e-3  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 1e-6
    scheduler: Literal["noam", "cosine", "constant"] = "noam"  # each after a linear warmup
    warmup_steps: int = 25000
    min_lr: float = 0.0  # cosine: the floor reached at train.max_steps
    clip_grad_norm: float | None = 5.0  # None: no clipping

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError("betas must be two numbers in [0, 1)")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("lr must be positive and warmup_steps not negative")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # everything random derives from it: init, data order, augmentation, dropout
    max_steps: int | None = None  # optimizer steps; training stops at whichever limit comes first
    max_epochs: int | None = 100
    accum_grad: int = 1  # micro-batches per optimizer step, per process
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16: autocast; fp16: CUDA only
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False  # CUDA: torch's deterministic algorithms (CPU always is)
    gradient_checkpointing: bool = False  # recompute encoder blocks in backward
    # torch.compile each encoder block (dynamic shapes); eager, with a warning, where
    # compile is unavailable. On the 2-core CPUs measured it is slower than eager
    # (README, performance): it is for CUDA.
    compile: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard lines
    valid_every: int | None = None  # steps between validations (also at every epoch end)
    save_every_steps: int | None = 1000
    save_every_minutes: float | None = 30.0
    keep_last: int = 3  # newest checkpoints kept
    keep_best: int = 3  # best checkpoints by `best_metric` on dev, also kept
    best_metric: str = "loss"  # a dev metric the model reports
    best_mode: Literal["min", "max"] = "min"
    max_bad_steps: int = 20  # consecutive non-finite updates before giving up
    oom_shrink: float | None = None  # after an out-of-memory batch, scale max_frames by this
    num_threads: int | None = None  # torch CPU threads; None: torch's default

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("set max_steps or max_epochs (or both)")
        if self.accum_grad < 1 or self.log_every < 1:
            raise ValueError("accum_grad and log_every must be at least 1")
        if self.keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        if self.oom_shrink is not None and not 0.0 < self.oom_shrink < 1.0:
            raise ValueError("oom_shrink must be in (0, 1)")


@dataclass(frozen=True)
class InitConfig:
    """Weights to start a new run from (not used when a run resumes: its checkpoint is)."""

    # An experiment folder (its best checkpoint by dev, else its newest), a checkpoint
    # folder, or a .safetensors file (a checkpoint's, or `echoic average`'s).
    checkpoint: str
    include: list[str] = field(default_factory=list)  # names (see echoic/train/stages.py); [] = all
    exclude: list[str] = field(default_factory=list)
    rename: dict[str, str] = field(default_factory=dict)  # checkpoint prefix -> model prefix
    strict: bool = True  # a missing, unexpected or mis-shaped key is an error

    def __post_init__(self) -> None:
        for old, new in self.rename.items():
            if not old or not new:
                raise ValueError("rename needs non-empty prefixes on both sides")


@dataclass(frozen=True)
class StageConfig:
    """One stage of a staged run: how long, what is trained, at what rate. Options left
    null take the run's (`optim`), and the schedule restarts at each stage."""

    name: str | None = None  # default: stage1, stage2, ...
    steps: int | None = None  # its length; the last stage may have none (train.max_*)
    epochs: int | None = None  # counted in whole epochs from the first epoch start
    freeze: list[str] = field(default_factory=list)  # on top of the run's `freeze`
    train_only: list[str] | None = None  # or: everything else is frozen
    lr: float | None = None
    warmup_steps: int | None = None
    scheduler: Literal["noam", "cosine", "constant"] | None = None
    min_lr: float | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("a stage has steps or epochs, not both")
        if (self.steps is not None and self.steps < 1) or (
            self.epochs is not None and self.epochs < 1
        ):
            raise ValueError("a stage's steps or epochs must be at least 1")
        if self.freeze and self.train_only is not None:
            raise ValueError("a stage has freeze or train_only, not both")
        if self.train_only is not None and not self.train_only:
            raise ValueError("train_only needs at least one name")


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataSection
    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    init: InitConfig | None = None
    # Parameter names (echoic/train/stages.py): a name is a parameter or any dotted
    # prefix of one, '*' standing for one part (encoder.layers.*.conv).
    freeze: list[str] = field(default_factory=list)
    # eval: frozen modules also stay in eval mode (fixed dropout and BatchNorm statistics)
    freeze_mode: Literal["train", "eval"] = "train"
    lr_scale: dict[str, float] = field(default_factory=dict)  # name -> learning-rate factor
    stages: list[StageConfig] = field(default_factory=list)
    # A live downstream probe of a pretraining run (echoic.train.probe); null: none.
    probe: ProbeConfig | None = None

    def __post_init__(self) -> None:
        for name, scale in self.lr_scale.items():
            if scale <= 0:
                raise ValueError(f"lr_scale of '{name}' must be positive (freeze it instead)")
        names = [stage.name for stage in self.stages if stage.name is not None]
        if len(set(names)) != len(names):
            raise ValueError("stage names must differ")
        for index, stage in enumerate(self.stages):
            last = index == len(self.stages) - 1
            if stage.steps is None and stage.epochs is None and not last:
                raise ValueError(f"stages[{index}] needs steps or epochs (only the last may not)")
            scheduler = stage.scheduler or self.optim.scheduler
            if (
                scheduler == "cosine"
                and stage.steps is None
                and not (last and self.train.max_steps is not None)
            ):
                raise ValueError(f"stages[{index}]: the cosine schedule needs the stage's steps")
        if self.train.precision == "fp16" and self.train.device == "cpu":
            raise ValueError("train.precision fp16 needs CUDA; use bf16 on CPU")
        if self.optim.scheduler == "cosine" and self.train.max_steps is None:
            raise ValueError("optim.scheduler cosine needs train.max_steps (its length)")
        # The rules that tie the model to the other sections are its family's own.
        waveform_model = self.model.waveform_input
        if waveform_model is not None and self.data.spec_augment is not None:
            raise ValueError(
                f"data.spec_augment masks fbank, and {waveform_model} takes waveform: "
                "set data.spec_augment: null"
            )
        if self.probe is not None and not self.model.pretrains:
            raise ValueError(
                f"probe measures a pretraining run (model.hubert), not a {self.model.family} model"
            )
        self.model.check_data(self.data)


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override (`section.key=value`) and validate an experiment config."""
    raw = apply_overrides(load_yaml(path), overrides or [])
    return parse_experiment(raw, where=str(path))


def parse_experiment(raw: dict[str, Any], where: str = "config") -> ExperimentConfig:
    try:
        return from_dict(ExperimentConfig, raw, "")
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def dump_experiment(config: ExperimentConfig) -> str:
    """The resolved config as YAML (every default written out)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# Keys that may change when a run resumes without breaking exact resume: they decide
# how long, how often and where, not what is computed.
SAFE_TO_CHANGE = {
    "data.num_workers",
    "data.dev",
    "train.max_steps",  # except when it is the cosine schedule's length (breaking_changes)
    "train.max_epochs",
    "train.log_every",
    "train.valid_every",
    "train.save_every_steps",
    "train.save_every_minutes",
    "train.keep_last",
    "train.keep_best",
    "train.best_metric",
    "train.best_mode",
    "train.max_bad_steps",
    "train.distributed",
}

# Keys that look harmless but change results, with why (for the error message).
_WHY_BREAKING = {
    # Matrix products split their sums over threads: another count rounds differently.
    "train.num_threads": "which changes float rounding",
    # Compiled kernels round differently and draw dropout masks with Inductor's RNG.
    "train.compile": "which changes float rounding and dropout masks",
}


def breaking_changes(old: ExperimentConfig, new: ExperimentConfig) -> dict[str, str]:
    """The changed keys that make a resumed run differ from an uninterrupted run of the
    new config, each with why where it is not plain ("" otherwise)."""
    breaking = {}
    for key, _, _ in config_differences(old, new):
        if key.endswith(".subsampling") and old.model.subsampling() == new.model.subsampling():
            continue  # `auto` (the default since SSL frontends) and the factor it resolves to
        if key == "train.max_steps" and "cosine" in (old.optim.scheduler, new.optim.scheduler):
            # The schedule runs to min_lr at max_steps: another length changes the rate of
            # every step from here on (and of the steps already taken, in the new run).
            breaking[key] = "which is the cosine schedule's length"
        elif key not in SAFE_TO_CHANGE and key.split(".")[0] not in ("init", "probe"):
            # (`init` is read when a run starts, never on resume: the checkpoint is; a
            # `probe` measures the run and never changes it.)
            breaking[key] = _WHY_BREAKING.get(key, "")
    return breaking


def config_differences(old: ExperimentConfig, new: ExperimentConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs."""
    differences: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            differences.append((prefix, a, b))

    walk(to_dict(old), to_dict(new), "")
    return differences
