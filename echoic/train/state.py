"""What a checkpoint holds besides the weights, in one place: gathered, written, read
back, checked and upgraded here, so a key cannot be saved and then forgotten on resume.

The state describes an optimizer-step boundary (see echoic.train.trainer's rules for
exact resume): the data position, the out-of-memory budgets, metric sums, utterances
the model left out, the stage, the optimizer and scaler, the global random generators,
the best dev results and the counters. Loading is strict: a key this version does not
know, or one it needs and does not find, is a one-line error naming them. Version 1
(before the running epoch had its own max_frames) is upgraded on load.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from echoic.errors import EchoicError

STATE_VERSION = 2  # 2: the running epoch's max_frames, utterances the model left out


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_index: int = 0  # global batches of `epoch` consumed
    # Two budgets: an out-of-memory batch shrinks the one for the epochs to come, while
    # the running epoch keeps the batches it was planned with.
    max_frames: int | None = None
    epoch_max_frames: int | None = None
    tracker: dict[str, Any] = field(default_factory=dict)  # MetricSums.state_dict()
    dropped: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"counts": {}, "examples": {}}
    )  # utterances the model left out this epoch: reason -> count, reason -> first
    stage: dict[str, int] = field(default_factory=dict)  # stages.StagePosition.state_dict()
    optimizer: dict[str, Any] | None = None  # by parameter name (distributed.optimizer_state)
    scaler: dict[str, Any] | None = None  # fp16's GradScaler
    rng: dict[str, Any] = field(default_factory=dict)  # rng_state()
    best: list[list[float]] = field(default_factory=list)  # [value, step] of the best dev results
    bad_steps: int = 0  # consecutive non-finite updates
    global_accum: int = 1  # micro-batches per step over all processes
    metrics_offset: int | None = None  # metrics.jsonl's length at this state

    def state_dict(self) -> dict[str, Any]:
        """What `save_checkpoint` writes (torch.save, read back with weights_only)."""
        return {"version": STATE_VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], metric_keys: Iterable[str], where: str
    ) -> TrainState:
        """The state a checkpoint (`where`, for errors) holds, upgraded to this version;
        `metric_keys` are the model's, which version 1 did not save in full."""
        check_version(state, where)
        state = dict(state)
        version = state.pop("version")
        if version == 1:
            state = _upgrade_v1(state, metric_keys)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(state) - known)
        missing = sorted(known - set(state) - {"stage"})  # runs before stages had no stage
        if unknown or missing:
            raise EchoicError(
                f"{where}: checkpoint state has keys this echoic does not know {unknown} "
                f"or lacks {missing} (version {version})"
            )
        return cls(**state)


def check_version(state: dict[str, Any], where: str) -> None:
    """Refuse, before anything is built, a state whose version this echoic cannot read."""
    if state.get("version") not in (1, STATE_VERSION):
        raise EchoicError(
            f"{where}: checkpoint state version {state.get('version')} is not supported"
        )


def _upgrade_v1(state: dict[str, Any], metric_keys: Iterable[str]) -> dict[str, Any]:
    """A version-1 state in version 2's form. Version 1 had one max_frames for the
    running epoch and the next ones (exact unless an out-of-memory batch shrank it), and
    metric sums only for the keys seen in the window, None for a model's missing heads."""
    sums = state["tracker"]["sums"]
    tracker = {k: sums[k] if sums.get(k) is not None else [0.0, 0.0] for k in metric_keys}
    return {
        **state,
        "epoch_max_frames": state["max_frames"],
        "tracker": {"sums": tracker},
        "dropped": {"counts": {}, "examples": {}},
    }


def rng_state() -> dict[str, Any]:
    """Global generators, for code outside echoic that may draw from them (echoic's own
    randomness is reseeded per batch and does not need them)."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0)
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
