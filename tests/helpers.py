"""What several test files share: tiny model configs and batches, the test experiment
config, running `echoic` in a subprocess, pausing and killing a run at a given point, and
comparing two runs bit for bit. Test files import from here, never from each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from echoic.config import from_dict
from echoic.data.batch import Batch
from echoic.models.model import ModelConfig
from echoic.train.checkpoint import list_checkpoints
from echoic.train.trainer import Trainer

# -- tiny models ----------------------------------------------------------------------------

VOCAB = 12
TINY = {"d_model": 32, "num_layers": 2, "num_heads": 2, "ffn_dim": 64}


def tiny_config(heads: dict, encoder: str = "conformer", **encoder_kw) -> ModelConfig:
    enc = dict(TINY, **encoder_kw)
    if encoder == "conformer":
        enc["conv_kernel"] = 3
    raw = {"frontend": {"fbank": {"global_cmvn": False}}, "encoder": {encoder: enc}, **heads}
    return from_dict(ModelConfig, raw, "model")


def make_batch(batch: int = 3, frames: int = 60, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    feat_lens = torch.tensor([frames, frames - 17, frames - 30][:batch])
    token_lens = torch.tensor([5, 3, 1][:batch])
    feats = torch.randn(batch, frames, 80, generator=g)
    tokens = torch.randint(2, VOCAB - 1, (batch, 5), generator=g)
    for row in range(batch):
        feats[row, feat_lens[row] :] = 0
        tokens[row, token_lens[row] :] = -1
    return Batch(
        epoch=0,
        index=0,
        ids=[f"u{i}" for i in range(batch)],
        texts=[""] * batch,
        durations=[1.0] * batch,
        tokens=tokens,
        token_lens=token_lens,
        feats=feats,
        feat_lens=feat_lens,
        audio=None,
        audio_lens=None,
    )


# -- the test experiment and runs of it -----------------------------------------------------


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def write_config(tmp_path: Path, corpus: Path, lang: Path, **sections) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = {
        "data": {
            "train": str(corpus / "train.jsonl"),
            "dev": str(corpus / "dev.jsonl"),
            "lang": str(lang),
            "max_frames": 1500,
            "speed_perturb": [0.9, 1.0, 1.1],
            "num_workers": 0,
        },
        "model": {
            "encoder": {
                "conformer": {
                    "d_model": 32,
                    "num_layers": 1,
                    "num_heads": 2,
                    "ffn_dim": 64,
                    "conv_kernel": 5,
                }
            },
            "ctc": {"weight": 0.3},
            "attention": {"weight": 0.7, "num_layers": 1, "num_heads": 2, "ffn_dim": 64},
        },
        "optim": {"lr": 0.002, "warmup_steps": 5},
        "train": {
            "max_steps": 14,
            "accum_grad": 2,
            "log_every": 1,
            "valid_every": 4,
            "save_every_steps": 3,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_merge(config, sections)))
    return path


def echoic(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "echoic", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def start_paused(
    config: Path, exp: Path, where: str, *extra: str, new_session: bool = False
) -> subprocess.Popen:
    """Start training that stops at `where` (see PausePoint) and wait until it is there.
    `new_session`: in a process group of its own, so a test can signal the whole group."""
    command = [
        sys.executable,
        "-m",
        "echoic",
        "train",
        str(config),
        "--exp",
        str(exp),
        "--no-progress",
        *extra,
    ]
    process = subprocess.Popen(
        command,
        env={**os.environ, "ECHOIC_PAUSE_AT": where},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )
    deadline = time.time() + 180
    while not (exp / "paused").exists():
        if process.poll() is not None:
            raise AssertionError(f"training ended before {where}: {process.stderr.read()[-2000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"training did not reach {where}")
        time.sleep(0.05)
    (exp / "paused").unlink()
    return process


def final_weights(exp: Path) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(exp / "checkpoints")[-1] / "model.safetensors")


def deterministic_lines(exp: Path) -> list[str]:
    lines = (exp / "metrics.jsonl").read_text().splitlines()
    return [line for line in lines if json.loads(line)["split"] in ("train", "dev")]


def assert_same_run(exp: Path, reference: Path) -> None:
    got, expected = final_weights(exp), final_weights(reference)
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"weights differ: {different[:5]}"
    assert deterministic_lines(exp) == deterministic_lines(reference)


class Killed(Exception):
    """Stands for SIGKILL in an in-process run: it escapes the loop, nothing is saved."""


def stop_at(trainer: Trainer, where: str, how: str) -> None:
    """At pause point `where` (see PausePoint): "kill" the run, or "stop" it as SIGTERM
    does (a checkpoint of the last step boundary, then a clean exit)."""

    def check(key: str, stop) -> None:
        if key != where:
            return
        if how == "kill":
            raise Killed(key)
        stop.requested = "SIGTERM"

    trainer.pause.check = check


def kill_and_resume(make_trainer: Callable[[], Trainer], kill_at: str) -> None:
    """Run a trainer until pause point `kill_at` and kill it there, as SIGKILL would
    (nothing is saved on the way out), then run a new one from the newest checkpoint to
    the end. Compare the result with an uninterrupted run with `assert_same_run`."""
    interrupted = make_trainer()
    stop_at(interrupted, kill_at, "kill")
    with pytest.raises(Killed):
        interrupted.run()
    assert make_trainer().run() == 0
