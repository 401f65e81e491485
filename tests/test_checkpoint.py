import errno
import json
import os

import pytest
import torch

from echoic.train import checkpoint as ckpt


class Arbitrary:
    """Stands for any pickled object a malicious or careless state file could carry."""


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((3, 2), value), "b.count": torch.tensor(int(value))}


def test_save_load_round_trip_without_pickled_code(tmp_path):
    state = {"step": 5, "optimizer": {"state": {}, "param_groups": []}, "tensor": torch.arange(3)}
    path = ckpt.save_checkpoint(tmp_path, 5, _weights(1.0), state)
    assert path.name == "step-00000005"
    assert sorted(p.name for p in path.iterdir()) == [
        "checksums.json",
        "model.safetensors",
        "state.pt",
    ]
    weights, loaded = ckpt.load_checkpoint(path)
    assert torch.equal(weights["a"], _weights(1.0)["a"])
    assert loaded["step"] == 5 and torch.equal(loaded["tensor"], torch.arange(3))
    # A state holding arbitrary objects cannot be loaded back: weights_only refuses it.
    bad = ckpt.save_checkpoint(tmp_path, 6, _weights(2.0), {"object": Arbitrary()})
    with pytest.raises(Exception, match=r"Weights only load failed|Unsupported global"):
        ckpt.load_checkpoint(bad)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, _weights(1.0), {"step": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "fsync", full)
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"could not save checkpoint step-00000002 .*No space left on device; "
        r"earlier checkpoints are intact",
    ):
        ckpt.save_checkpoint(tmp_path, 2, _weights(2.0), {"step": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]  # no half-written folder left
    assert ckpt.newest_valid(tmp_path).name == "step-00000001"


def test_corrupt_or_half_written_checkpoints_are_skipped(tmp_path, caplog):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, _weights(float(step)), {"step": step})
    weights = tmp_path / "step-00000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # a copy cut short
    (tmp_path / "step-00000002" / "checksums.json").unlink()  # a write interrupted before the end
    assert ckpt.newest_valid(tmp_path).name == "step-00000001"
    assert (
        "step-00000003 is unusable (model.safetensors does not match its checksum)" in caplog.text
    )
    assert "step-00000002 is unusable (checksums.json is missing" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="unusable"):
        ckpt.load_checkpoint(tmp_path / "step-00000003")


def test_saving_the_same_step_again_replaces_it(tmp_path):
    ckpt.save_checkpoint(tmp_path, 4, _weights(1.0), {"epoch": 0})
    ckpt.save_checkpoint(tmp_path, 4, _weights(2.0), {"epoch": 1})
    _, state = ckpt.load_checkpoint(tmp_path / "step-00000004")
    assert state["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["step-00000004"]


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    for step in range(1, 8):
        ckpt.save_checkpoint(tmp_path, step, _weights(float(step)), {})
    ckpt.prune(tmp_path, keep_last=2, keep={2, 4})
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [2, 4, 6, 7]


def test_average_weights(tmp_path):
    paths = [ckpt.save_checkpoint(tmp_path, s, _weights(float(s)), {}) for s in (1, 2, 6)]
    averaged = ckpt.average_weights(paths)
    assert torch.allclose(averaged["a"], torch.full((3, 2), 3.0))
    assert int(averaged["b.count"]) == 6  # integer buffers come from the newest
    assert json.loads((paths[0] / "checksums.json").read_text()).keys() == {
        "model.safetensors",
        "state.pt",
    }
