"""Starting a new run from other weights (`init:`): which checkpoint, which keys, under
which names, with the rows of token-indexed parameters moved when the vocabulary
changed (the model's own `token_indexed_parameters()`), and a report of what loaded.
Names follow echoic.train.stages."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from echoic.data.tokenizer import Tokenizer, load_tokenizer
from echoic.errors import ConfigError, EchoicError
from echoic.train import checkpoint as ckpt
from echoic.train.config import InitConfig
from echoic.train.experiment import best_or_newest
from echoic.train.stages import check_names, name_matches

log = logging.getLogger(__name__)

INIT_REPORT = "init.txt"


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
        chosen, why = best_or_newest(where, "init.checkpoint")
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
