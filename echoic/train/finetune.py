"""Fine-tuning: which parameters are trained, at what rate, in which stage, from which weights.

Names. A name in `freeze`, `lr_scale`, a stage's `freeze`/`train_only` and `init`'s
`include`/`exclude` selects the parameters it equals or is a dotted prefix of:
`encoder` selects `encoder.layers.0.w` and never `encoder_proj.w`. `*` stands for one
part: `encoder.layers.*.conv` selects every layer's `conv`. A name that selects nothing
is an error naming the model's top-level modules, never a silent no-op.

Nothing here depends on a model family: names come from `named_parameters()` and the
state dict, and the rows to remap after a vocabulary change from the model's own
`token_indexed_parameters()`.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from echoic.data.tokenizer import Tokenizer, load_tokenizer
from echoic.errors import ConfigError, EchoicError
from echoic.train import checkpoint as ckpt
from echoic.train.config import ExperimentConfig, InitConfig, OptimConfig

log = logging.getLogger(__name__)

INIT_REPORT = "init.txt"


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


# -- initialisation ------------------------------------------------------------------------


@dataclass
class InitSource:
    weights: Path  # a .safetensors file
    tokenizer: Path | None  # the tokenizer the weights were trained with, when known
    why: str  # how it was chosen, for the report


@dataclass
class InitReport:
    source: InitSource
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model lacks
    mismatched: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # left out by include/exclude
    vocabulary: str = ""  # what a vocabulary change did, "" without one

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)

    def table(self) -> str:
        lines = [f"init from {self.source.weights} ({self.source.why})"]
        modules: dict[str, list[int]] = {}
        for column, keys in enumerate(
            (self.loaded, self.missing, self.unexpected, [k for k, _, _ in self.mismatched])
        ):
            for key in keys:
                modules.setdefault(key.split(".")[0], [0, 0, 0, 0])[column] += 1
        lines.append(
            f"{'module':<14}{'loaded':>9}{'missing':>9}{'unexpected':>12}{'mismatched':>12}"
        )
        for module, counts in modules.items():
            lines.append(f"{module:<14}{counts[0]:>9}{counts[1]:>9}{counts[2]:>12}{counts[3]:>12}")
        if self.skipped:
            lines.append(f"left out by include/exclude: {len(self.skipped)} keys")
        if self.vocabulary:
            lines.append(self.vocabulary)
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            lines.extend(f"{title}: {key}" for key in keys)
        lines.extend(f"mismatched: {k} checkpoint {a} model {b}" for k, a, b in self.mismatched)
        return "\n".join(lines)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} loaded"]
        for title, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape-mismatched", [k for k, _, _ in self.mismatched]),
        ):
            if keys:
                parts.append(f"{len(keys)} {title} (first {keys[0]})")
        return ", ".join(parts)


def resolve_init_source(path: str) -> InitSource:
    """The weights file `init.checkpoint` names, and the tokenizer beside it."""
    where = Path(path)
    if where.is_dir() and (where / "checkpoints").is_dir():
        chosen, why = _best_or_newest(where)
        return InitSource(chosen / ckpt.WEIGHTS, _tokenizer_near(where), why)
    if where.is_dir() and (where / ckpt.WEIGHTS).is_file():
        problem = ckpt.verify(where)
        if problem:
            raise EchoicError(f"init.checkpoint {where}: {problem}")
        return InitSource(where / ckpt.WEIGHTS, _tokenizer_near(where), "the checkpoint named")
    if where.is_file() and where.suffix == ".safetensors":
        return InitSource(where, _tokenizer_near(where), "the file named")
    raise EchoicError(
        f"init.checkpoint {where}: not an experiment folder (with checkpoints/), a checkpoint "
        "folder (with model.safetensors) or a .safetensors file"
    )


def _best_or_newest(exp_dir: Path) -> tuple[Path, str]:
    directory = exp_dir / "checkpoints"
    newest = ckpt.newest_valid(directory)
    if newest is None:
        raise EchoicError(f"init.checkpoint {exp_dir}: no valid checkpoint in {directory}")
    _, state = ckpt.load_checkpoint(newest)
    for value, step in state.get("best", []):
        candidate = directory / ckpt.checkpoint_name(int(step))
        if candidate.is_dir() and ckpt.verify(candidate) is None:
            return candidate, f"best dev value {value:.4g} at step {int(step)}"
    return newest, "newest: no kept checkpoint has a dev result"


def _tokenizer_near(path: Path) -> Path | None:
    """exp/tokenizer.json for exp/, exp/checkpoints/step-N[/model.safetensors] and
    exp/average-*.safetensors."""
    for folder in (path, *list(path.parents)[:3]):
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    return None


def _rename(key: str, rename: dict[str, str]) -> str:
    for old, new in rename.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return key


def initialize(
    model: nn.Module, config: InitConfig, tokenizer: Tokenizer, report_dir: Path | None
) -> InitReport:
    """Load `config.checkpoint` into `model` as `config` says; writes the report table
    to `report_dir`/init.txt and logs it. Under `strict`, any missing, unexpected or
    mis-shaped key is an error (after the report is written)."""
    source = resolve_init_source(config.checkpoint)
    try:
        weights = load_file(source.weights)
    except (SafetensorError, OSError) as error:
        raise EchoicError(f"init.checkpoint: cannot read {source.weights}: {error}") from None
    for old in config.rename:
        if not any(k == old or k.startswith(old + ".") for k in weights):
            raise ConfigError(f"'init.rename': '{old}' is no prefix of a checkpoint key")
    weights = {_rename(key, config.rename): value for key, value in weights.items()}
    target = model.state_dict()
    every = sorted(set(target) | set(weights))
    check_names(config.include, every, "init.include", model)
    check_names(config.exclude, every, "init.exclude", model)

    def wanted(key: str) -> bool:
        included = not config.include or any(name_matches(p, key) for p in config.include)
        return included and not any(name_matches(p, key) for p in config.exclude)

    report = InitReport(source, skipped=[k for k in every if not wanted(k)])
    rows = _row_map(source.tokenizer, tokenizer)
    token_indexed = set(model.token_indexed_parameters()) if rows is not None else set()
    updates: dict[str, torch.Tensor] = {}
    remapped = []
    for key in target:
        if not wanted(key):
            continue
        if key not in weights:
            report.missing.append(key)
        elif key in token_indexed and weights[key].shape[1:] == target[key].shape[1:]:
            updates[key] = _remap_rows(weights[key], target[key], rows)
            report.loaded.append(key)
            remapped.append(key)
        elif weights[key].shape != target[key].shape:
            report.mismatched.append((key, list(weights[key].shape), list(target[key].shape)))
        else:
            updates[key] = weights[key]
            report.loaded.append(key)
    report.unexpected = [k for k in weights if wanted(k) and k not in target]
    if rows is not None:
        report.vocabulary = _vocabulary_note(rows, tokenizer, remapped)
    text = report.table()
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / INIT_REPORT).write_text(text + "\n")
    log.info("%s", text)
    if report.problems and config.strict:
        where = f" (table in {report_dir / INIT_REPORT})" if report_dir else ""
        raise ConfigError(
            f"init from {source.weights}: {report.summary()}{where}; "
            "set init.strict: false to load the rest"
        )
    model.load_state_dict({**target, **updates}, strict=True)
    return report


def _row_map(old_path: Path | None, new: Tokenizer) -> list[int | None] | None:
    """For each new token id, the old id of the same token (None for a new token); None
    when the vocabulary did not change or the old one is unknown."""
    if old_path is None:
        return None
    old = load_tokenizer(old_path)
    if old.tokens == new.tokens:
        return None
    index = {token: i for i, token in enumerate(old.tokens)}
    return [index.get(token) for token in new.tokens]


def _remap_rows(
    old: torch.Tensor, fresh: torch.Tensor, rows: list[int | None] | None
) -> torch.Tensor:
    """The new tensor: each token's row from the old one, a new token's as initialised."""
    if rows is None:
        return old
    result = fresh.clone()
    kept = [(new, old_id) for new, old_id in enumerate(rows) if old_id is not None]
    if kept:
        new_ids, old_ids = (torch.tensor(ids) for ids in zip(*kept))
        result[new_ids] = old[old_ids].to(result.dtype)
    return result


def _vocabulary_note(rows: list[int | None], new: Tokenizer, remapped: list[str]) -> str:
    fresh = [new.tokens[i] for i, old in enumerate(rows) if old is None]
    shown = ", ".join(json.dumps(t) for t in fresh[:10]) + (" ..." if len(fresh) > 10 else "")
    return (
        f"vocabulary changed: {len(rows) - len(fresh)} of {len(rows)} tokens kept their rows, "
        f"{len(fresh)} new re-initialised ({shown or 'none'}) in {', '.join(remapped) or '-'}"
    )
