import errno
import io
import json
import os

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

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


def _fsync_full(monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "fsync", full)


def _safetensors_full(monkeypatch):
    """The weights file cut off midway, and the error safetensors 0.8 really raises when
    the disk fills up under save_file (seen on a 64 KiB tmpfs): not an OSError."""

    def full(tensors, path, metadata=None):
        data = safetensors.torch.save(tensors)
        with open(path, "wb") as stream:
            stream.write(data[: len(data) // 2])
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(ckpt, "save_file", full)


def _torch_save_full(monkeypatch):
    """state.pt cut off midway, and the error torch.save really raises on a full disk
    (seen on a 64 KiB tmpfs): a RuntimeError that does not say why."""
    real = torch.save

    def full(obj, path, *args, **kwargs):
        buffer = io.BytesIO()
        real(obj, buffer)
        with open(path, "wb") as stream:
            stream.write(buffer.getvalue()[:100])
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt.torch, "save", full)


@pytest.mark.parametrize(
    ("fill", "reason"),
    [
        (_fsync_full, "No space left on device"),
        (_safetensors_full, r"model.safetensors: .*No space left on device \(os error 28\)"),
        (_torch_save_full, r"state.pt: \[enforce fail .* 704 vs 598, \d+ MB free on its disk"),
    ],
    ids=["fsync", "safetensors", "torch.save"],
)
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fill, reason):
    ckpt.save_checkpoint(tmp_path, 1, _weights(1.0), {"step": 1})
    fill(monkeypatch)
    with pytest.raises(
        ckpt.CheckpointError,
        match=rf"could not save checkpoint step-00000002 in .*: {reason}.*; "
        "earlier checkpoints are intact$",
    ) as raised:
        ckpt.save_checkpoint(tmp_path, 2, _weights(2.0), {"step": 2})
    monkeypatch.undo()
    assert "\n" not in str(raised.value)  # one line, for the log
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]  # no half-written folder left
    assert ckpt.newest_valid(tmp_path).name == "step-00000001"
    weights, state = ckpt.load_checkpoint(tmp_path / "step-00000001")
    assert torch.equal(weights["a"], _weights(1.0)["a"]) and state == {"step": 1}


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
