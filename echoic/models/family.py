"""The family table's machinery: a model family is a config section and a builder.

An experiment's `model` section is one family's config (a `ModelSection`). Which
family is chosen by the key that only it takes (`paraformer:`, `hubert:`); without
one, the default family (ASR heads on an encoder). Each family registers once
(echoic.models.model holds echoic's own table):

    register(Family("toy", ToyConfig, build_toy, selected_by="toy"))

and from then on `model: {toy: {...}}` parses into a ToyConfig, `build_model` builds
it, the trainer trains it through the contract (echoic.models.contract), decoding runs
the methods its model's `decode_methods` names, and export traces its `export_path`.
The cross-section rules that tie a family to the other sections (data, probe) are the
config's own methods, so the experiment config never asks which family it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from echoic.config import from_dict, unknown_key_message
from echoic.data.dataset import DataConfig
from echoic.data.features import CmvnStats
from echoic.errors import ConfigError
from echoic.models.contract import TrainableModel


@dataclass(frozen=True)
class ModelSection:
    """The `model` section as one family reads it: each family's config derives from
    this and adds its fields; the methods below are its answers to the other sections,
    with the defaults of a family that needs none of them."""

    family: ClassVar[str] = ""  # the name the family registered with

    @classmethod
    def parse_section(cls, data: Mapping[str, Any], where: str) -> ModelSection:
        """The family config that `data` selects, validated (see the module docstring)."""
        return parse_model_section(data, where)

    @classmethod
    def without_legacy_keys(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
        """`data` less the keys that configs written by older echoic held for this family
        and that mean nothing now; a family overrides it where there are such keys."""
        return data

    @property
    def wants_cmvn(self) -> bool:
        """Whether the model normalises fbank with `echoic prepare`'s statistics."""
        return False

    @property
    def waveform_input(self) -> str | None:
        """Why fbank augmentation cannot apply (the model takes waveform), or None."""
        return None

    @property
    def uses_training_hotwords(self) -> bool:
        """Whether the model learns from the batches' hotwords (data.hotwords)."""
        return False

    @property
    def pretrains(self) -> bool:
        """Whether this is a self-supervised pretraining model, which a probe measures."""
        return False

    def check_data(self, data: DataConfig) -> None:
        """Raise ValueError for data settings this family cannot train with."""
        if data.hotwords is not None and not self.uses_training_hotwords:
            raise ValueError(
                "data.hotwords is for a model with hotword modules (model.paraformer.bias)"
            )

    def subsampling(self) -> int | None:
        """The encoder's subsampling factor as resolved, for resume checks; None where
        there is no such thing or it cannot be resolved."""
        return None


@dataclass(frozen=True)
class Family:
    name: str
    config: type[ModelSection]
    # (config, vocabulary size, CMVN statistics or None) -> the model
    build: Callable[[Any, int, CmvnStats | None], TrainableModel]
    # The `model` key only this family takes, whose (non-null) presence selects it;
    # None for the default family, chosen when no other family's key is there.
    selected_by: str | None


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the table (once per name); returns it."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered already")
    taken = {f.selected_by for f in _FAMILIES.values()}
    if family.selected_by in taken:
        key = family.selected_by or "no key (the default)"
        raise ValueError(f"model family {family.name!r}: {key} selects another family")
    family.config.family = family.name
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family (tests register toy families and remove them again)."""
    _FAMILIES.pop(name)


def families() -> list[Family]:
    return list(_FAMILIES.values())


def _fields(config: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if f.init]


def parse_model_section(data: Mapping[str, Any], where: str) -> ModelSection:
    """The family config of a `model` section: the family its keys select, with a
    one-line error for two families' keys at once or a key no family takes."""
    selected = [
        f for f in _FAMILIES.values() if f.selected_by and data.get(f.selected_by) is not None
    ]
    if len(selected) > 1:
        keys = " and ".join(f"{where}.{f.selected_by}" for f in selected)
        raise ConfigError(f"'{where}': {keys} are two model families: keep one")
    if selected:
        family = selected[0]
    else:
        family = next(f for f in _FAMILIES.values() if f.selected_by is None)
    own = _fields(family.config)
    data = family.config.without_legacy_keys(dict(data), where)
    everyone = {name for f in _FAMILIES.values() for name in _fields(f.config)}
    others = []
    for key in list(data):
        if key in own:
            continue
        if key in everyone and data[key] is None:
            del data[key]  # configs written before each family had its own section
        elif key in everyone:
            others.append(str(key))
        else:
            raise ConfigError(unknown_key_message(str(key), where, sorted(everyone)))
    if others:
        raise ConfigError(
            f"'{where}': a {family.name} model takes {', '.join(own)}: "
            f"remove {' and '.join(others)}"
        )
    return from_dict(family.config, data, where)


def build_model(
    config: ModelSection, vocab_size: int, cmvn: CmvnStats | None = None
) -> TrainableModel:
    """The model for `config`, with the vocabulary size from the tokenizer and, for an
    fbank frontend with global CMVN, the statistics from `echoic prepare`."""
    family = _FAMILIES.get(config.family)
    if family is None or not isinstance(config, family.config):
        raise ValueError(f"{type(config).__name__} is no registered family's config")
    return family.build(config, vocab_size, cmvn)
