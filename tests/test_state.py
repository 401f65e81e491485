"""The checkpoint state: written and read back in one place, strict about its keys,
version 1 upgraded."""

import pytest
import torch

from echoic.errors import EchoicError
from echoic.train.state import STATE_VERSION, TrainState, rng_state, set_rng_state


def _state() -> TrainState:
    return TrainState(
        step=7,
        epoch=1,
        batch_index=3,
        max_frames=900,
        epoch_max_frames=1000,
        tracker={"sums": {"loss": [2.0, 4.0]}},
        stage={"index": 0, "start_step": 0, "start_epoch": 0, "start_batch_index": 0},
        optimizer={"state": {}, "param_groups": []},
        rng=rng_state(),
        best=[[0.5, 4]],
        global_accum=2,
        metrics_offset=120,
    )


def test_a_state_reads_back_what_it_wrote():
    saved = _state().state_dict()
    assert saved["version"] == STATE_VERSION
    back = TrainState.from_state_dict(saved, ["loss"], "ckpt")
    assert (back.step, back.epoch, back.batch_index, back.max_frames) == (7, 1, 3, 900)
    assert back.best == [[0.5, 4]] and back.metrics_offset == 120


def test_unknown_or_missing_keys_and_other_versions_are_one_line_errors():
    saved = _state().state_dict()
    with pytest.raises(EchoicError, match=r"ckpt: .*does not know \['sampler'\]"):
        TrainState.from_state_dict({**saved, "sampler": {}}, ["loss"], "ckpt")
    without = {k: v for k, v in saved.items() if k != "bad_steps"}
    with pytest.raises(EchoicError, match=r"lacks \['bad_steps'\]"):
        TrainState.from_state_dict(without, ["loss"], "ckpt")
    with pytest.raises(EchoicError, match="version 9 is not supported"):
        TrainState.from_state_dict({**saved, "version": 9}, ["loss"], "ckpt")


def test_version_1_is_upgraded():
    saved = _state().state_dict()
    v1 = {k: v for k, v in saved.items() if k not in ("epoch_max_frames", "dropped")}
    v1 = {**v1, "version": 1, "tracker": {"sums": {"loss": [2.0, 4.0], "loss_ctc": None}}}
    state = TrainState.from_state_dict(v1, ["loss", "loss_ctc", "th_accuracy"], "ckpt")
    assert state.epoch_max_frames == state.max_frames == 900
    assert state.tracker == {
        "sums": {"loss": [2.0, 4.0], "loss_ctc": [0.0, 0.0], "th_accuracy": [0.0, 0.0]}
    }
    assert state.dropped == {"counts": {}, "examples": {}}


def test_random_generators_are_restored():
    saved = rng_state()
    first = torch.rand(3)
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), first)
