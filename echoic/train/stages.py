"""Which parameters are trained, at what rate, in which stage.

Names. A name in `freeze`, `lr_scale`, a stage's `freeze`/`train_only` and `init`'s
`include`/`exclude` selects the parameters it equals or is a dotted prefix of:
`encoder` selects `encoder.layers.0.w` and never `encoder_proj.w`. `*` stands for one
part: `encoder.layers.*.conv` selects every layer's `conv`. A name that selects nothing
is an error naming the model's top-level modules, never a silent no-op.

Nothing here depends on a model family: names come from `named_parameters()`.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from torch import nn

from echoic.errors import ConfigError
from echoic.train.config import ExperimentConfig, OptimConfig

log = logging.getLogger(__name__)


# -- names ---------------------------------------------------------------------------------


def name_matches(pattern: str, name: str) -> bool:
    """Whether `pattern` selects `name`: equal to it or to a dotted prefix of it, part by
    part, `*` (or any fnmatch pattern) matching within one part."""
    wanted, parts = pattern.split("."), name.split(".")
    if len(wanted) > len(parts):
        return False
    return all(fnmatch.fnmatchcase(part, want) for part, want in zip(parts, wanted))


def selected(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    return [name for name in names if any(name_matches(p, name) for p in patterns)]


def check_names(
    patterns: Iterable[str], names: Sequence[str], where: str, model: nn.Module
) -> None:
    """A one-line error for the first pattern that selects none of `names`."""
    for pattern in patterns:
        if any(name_matches(pattern, name) for name in names):
            continue
        prefixes = sorted({".".join(n.split(".")[: i + 1]) for n in names for i in range(4)})
        close = difflib.get_close_matches(pattern, prefixes, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        top = ", ".join(name for name, _ in model.named_children())
        raise ConfigError(
            f"'{where}': '{pattern}' names no parameter of the model{hint} "
            f"(its top-level modules: {top})"
        )


# -- stages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """A stage as the trainer runs it: its options resolved against the run's."""

    index: int  # from 0
    name: str
    freeze: tuple[str, ...]  # the run's and the stage's
    train_only: tuple[str, ...] | None
    optim: OptimConfig
    steps: int | None
    epochs: int | None


@dataclass
class StagePosition:
    """Where the running stage began; saved in checkpoints."""

    index: int = 0
    start_step: int = 0
    start_epoch: int = 0
    start_batch_index: int = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))


def plan_stages(config: ExperimentConfig) -> list[Stage]:
    """The declared stages, or one stage that is the whole run."""
    if not config.stages:
        return [Stage(0, "main", tuple(config.freeze), None, config.optim, None, None)]
    stages = []
    for index, stage in enumerate(config.stages):
        overrides = {
            key: getattr(stage, key)
            for key in ("lr", "warmup_steps", "scheduler", "min_lr")
            if getattr(stage, key) is not None
        }
        stages.append(
            Stage(
                index,
                stage.name or f"stage{index + 1}",
                (*config.freeze, *stage.freeze),
                tuple(stage.train_only) if stage.train_only is not None else None,
                replace(config.optim, **overrides),
                stage.steps,
                stage.epochs,
            )
        )
    return stages


def stage_over(stage: Stage, position: StagePosition, step: int, epoch: int, batch: int) -> bool:
    """Whether `stage`, begun at `position`, is done at this step boundary. An epoch
    stage counts whole epochs: begun mid-epoch, its first is the next one."""
    if stage.steps is not None:
        return step >= position.start_step + stage.steps
    if stage.epochs is not None:
        first = position.start_epoch + (1 if position.start_batch_index > 0 else 0)
        return batch == 0 and epoch >= first + stage.epochs
    return False


def check_stage_names(config: ExperimentConfig, model: nn.Module) -> None:
    """Every name of `freeze`, `lr_scale` and the stages selects a parameter."""
    names = [name for name, _ in model.named_parameters()]
    check_names(config.freeze, names, "freeze", model)
    check_names(config.lr_scale, names, "lr_scale", model)
    for index, stage in enumerate(config.stages):
        check_names(stage.freeze, names, f"stages[{index}].freeze", model)
        check_names(stage.train_only or [], names, f"stages[{index}].train_only", model)


def frozen_names(model: nn.Module, stage: Stage) -> list[str]:
    names = [name for name, _ in model.named_parameters()]
    frozen = set(selected(names, stage.freeze))
    if stage.train_only is not None:
        trained = set(selected(names, stage.train_only))
        frozen |= {name for name in names if name not in trained}
    return [name for name in names if name in frozen]


def eval_modules(model: nn.Module, frozen: set[str]) -> list[nn.Module]:
    """The modules that `freeze_mode: eval` keeps in eval mode: every module all of whose
    parameters are `frozen` (and that has some)."""
    modules = []
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        if own and all(p in frozen for p in own):
            modules.append(module)
    return modules


def parameter_groups(
    model: nn.Module,
    groups: list[dict],
    frozen: Iterable[nn.Parameter],
    lr_scale: dict[str, float],
) -> list[dict]:
    """The optimizer's groups: the model's own (`groups`, each with an `lr_scale`) less
    the `frozen` parameters, each split by the most specific `lr_scale` name that selects
    a parameter (scales multiply with the group's own)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    frozen_ids = {id(p) for p in frozen}
    # the most specific (most parts) first; a tie keeps the config's order
    patterns = sorted(lr_scale, key=lambda p: -len(p.split(".")))
    result = []
    for group in groups:
        split: dict[str | None, list[nn.Parameter]] = {}
        for parameter in group["params"]:
            if id(parameter) in frozen_ids:
                continue
            name = name_of[id(parameter)]
            pattern = next((p for p in patterns if name_matches(p, name)), None)
            split.setdefault(pattern, []).append(parameter)
        for pattern, params in split.items():
            scale = group.get("lr_scale", 1.0) * (lr_scale[pattern] if pattern else 1.0)
            label = group.get("name", "model") + (f":{pattern}" if pattern else "")
            result.append({"params": params, "lr_scale": scale, "name": label})
    return result


def parameter_table(model: nn.Module, frozen: Iterable[str]) -> str:
    """Trained and frozen parameter counts per top-level module."""
    frozen = set(frozen)
    rows: dict[str, list[int]] = {}
    for name, parameter in model.named_parameters():
        counts = rows.setdefault(name.split(".")[0], [0, 0])
        counts[1 if name in frozen else 0] += parameter.numel()
    lines = [f"{'module':<14}{'trained':>12}{'frozen':>12}"]
    for module, (trained, fixed) in rows.items():
        lines.append(f"{module:<14}{trained:>12,}{fixed:>12,}")
    total = [sum(c[i] for c in rows.values()) for i in (0, 1)]
    lines.append(f"{'total':<14}{total[0]:>12,}{total[1]:>12,}")
    return "\n".join(lines)
