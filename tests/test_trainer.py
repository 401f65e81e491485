"""The trainer: exact resume after SIGKILL or SIGTERM, corrupt checkpoints, config
checks, bad steps, out-of-memory batches, DDP on two processes, plots and averaging."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from echoic.data.augment import speed_perturb
from echoic.data.features import FbankConfig
from echoic.errors import ConfigError
from echoic.models.asr import AsrModel
from echoic.train.checkpoint import list_checkpoints
from echoic.train.config import load_experiment
from echoic.train.trainer import Trainer, TrainingAborted

# Epoch 0 of the session corpus is 20 batches of max_frames 1500: 10 steps of 2 micro-batches.
KILL_POINTS = ("3:1", "epoch-end:0", "12:0")  # mid-accumulation, epoch boundary, mid-epoch


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


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, lang) -> Path:
    """An uninterrupted run of the test config."""
    base = tmp_path_factory.mktemp("reference")
    config = write_config(base, corpus, lang)
    done = echoic("train", str(config), "--exp", str(base / "exp"), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in deterministic_lines(base / "exp") if '"train"' in line]
    assert [r["epoch"] for r in lines if r["step"] in (3, 10, 12)] == [
        0,
        0,
        1,
    ]  # the kill points' premise
    return base / "exp"


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_at_any_point_then_resume_is_bit_identical(
    tmp_path, corpus, lang, reference, workers
):
    config = write_config(tmp_path, corpus, lang, data={"num_workers": workers})
    exp = tmp_path / "exp"
    for where in KILL_POINTS:
        process = start_paused(config, exp, where)
        os.kill(process.pid, signal.SIGKILL)  # from outside: nothing is saved on the way out
        process.wait()
        assert process.returncode == -signal.SIGKILL
    done = echoic("train", str(config), "--exp", str(exp), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    assert_same_run(exp, reference)


@pytest.mark.slow
def test_sigterm_mid_accumulation_saves_and_resume_is_exact(tmp_path, corpus, lang, reference):
    config = write_config(tmp_path, corpus, lang)
    exp = tmp_path / "exp"
    process = start_paused(config, exp, "5:1")  # step 5 is neither a save nor a validation step
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "SIGTERM received" in stderr and "step-00000005 saved (stop (SIGTERM))" in stderr
    done = echoic("train", str(config), "--exp", str(exp), "--no-progress")
    assert (
        done.returncode == 0 and "resuming from" in done.stderr and "step-00000005" in done.stderr
    )
    assert_same_run(exp, reference)


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_reported_and_the_previous_used(tmp_path, corpus, lang, reference):
    config = write_config(tmp_path, corpus, lang)
    exp = tmp_path / "exp"
    process = start_paused(config, exp, "9:1")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    newest = list_checkpoints(exp / "checkpoints")[-1]
    assert newest.name == "step-00000009"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    done = echoic("train", str(config), "--exp", str(exp), "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        "step-00000009 is unusable (model.safetensors does not match its checksum)" in done.stderr
    )
    assert "resuming from" in done.stderr and "checkpoints/step-00000008 (step 8)" in done.stderr
    assert_same_run(exp, reference)


def test_config_errors_are_one_line(tmp_path, corpus, lang):
    config = write_config(tmp_path, corpus, lang, train={"max_step": 3})
    done = echoic("train", str(config), "--exp", str(tmp_path / "exp"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"echoic: error: {config}: unknown key 'train.max_step'; did you mean 'max_steps'? "
        "(allowed in 'train': seed, max_steps, max_epochs, accum_grad, precision, device, "
        "deterministic, gradient_checkpointing, distributed, log_every, valid_every, "
        "save_every_steps, save_every_minutes, "
        "keep_last, keep_best, best_metric, best_mode, max_bad_steps, oom_shrink, num_threads)"
    ]
    good = write_config(tmp_path, corpus, lang)
    for override, message in [
        ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'lr'?"),
        (
            "model.encoder.conformer.d_model=big",
            "'model.encoder.conformer.d_model' must be int, got 'big'",
        ),
        ("train.precision=fp8", "'train.precision' must be one of 'fp32', 'bf16', 'fp16'"),
        ("data.max_frames", "must look like section.key=value"),
    ]:
        done = echoic("train", str(good), "--exp", str(tmp_path / "exp"), "--set", override)
        assert (
            done.returncode == 2
            and message in done.stderr
            and len(done.stderr.strip().splitlines()) == 1
        )
    for overrides, message in [
        (
            [
                "data.feature_cache=true",
                "data.num_workers=2",
                "model.frontend.fbank.fbank.dither=1",
            ],
            "data.feature_cache needs model.frontend.fbank.fbank.dither 0",
        ),
    ]:
        sets = [arg for override in overrides for arg in ("--set", override)]
        done = echoic("train", str(good), "--exp", str(tmp_path / "exp"), *sets)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
        assert message in done.stderr, done.stderr
    raw = yaml.safe_load(good.read_text())
    del raw["data"]["lang"]
    good.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"missing required key 'data\.lang'"):
        load_experiment(good)


@pytest.mark.slow
def test_config_changes_on_resume(tmp_path, corpus, lang):
    config = write_config(tmp_path, corpus, lang, train={"max_steps": 3})
    exp = tmp_path / "exp"
    assert echoic("train", str(config), "--exp", str(exp), "--no-progress").returncode == 0
    done = echoic(
        "train",
        str(config),
        "--exp",
        str(exp),
        "--set",
        "optim.lr=0.01",
        "--set",
        "train.max_steps=4",
    )
    assert done.returncode == 2
    assert (
        "break exact resume (optim.lr)" in done.stderr and "optim.lr: 0.002 -> 0.01" in done.stderr
    )
    assert "train.max_steps: 3 -> 4" in done.stderr
    done = echoic(
        "train", str(config), "--exp", str(exp), "--set", "train.max_steps=4", "--no-progress"
    )
    assert (
        done.returncode == 0
        and "resuming with a changed config: train.max_steps: 3 -> 4" in done.stderr
    )
    done = echoic(
        "train",
        str(config),
        "--exp",
        str(exp),
        "--set",
        "optim.lr=0.01",
        "--set",
        "train.max_steps=5",
        "--allow-config-change",
        "--no-progress",
    )
    assert done.returncode == 0 and "optim.lr: 0.002 -> 0.01" in done.stderr
    assert "lr: 0.01" in (exp / "config.yaml").read_text()  # the saved config follows the run


def _in_process(tmp_path, corpus, lang, **sections) -> Trainer:
    config = load_experiment(write_config(tmp_path, corpus, lang, **sections))
    return Trainer(config, tmp_path / "exp", progress=False)


def test_non_finite_updates_are_skipped_then_training_stops(
    tmp_path, corpus, lang, monkeypatch, caplog
):
    original = AsrModel.forward
    poisoned = {2, 3}  # global batch indices of epoch 0: together they make step 2

    def forward(self, batch):
        out = original(self, batch)
        if batch.index in poisoned:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(AsrModel, "forward", forward)
    trainer = _in_process(tmp_path, corpus, lang, train={"max_steps": 4, "valid_every": None})
    assert trainer.run() == 0
    assert "step 2: non-finite gradient (norm nan): update skipped, 1 in a row" in caplog.text
    lines = [
        json.loads(line) for line in (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3, 4]
    # Every batch poisoned: the run stops with a clear message after max_bad_steps.
    poisoned.update(range(100))
    trainer = _in_process(tmp_path / "b", corpus, lang, train={"max_steps": 10, "max_bad_steps": 3})
    with pytest.raises(TrainingAborted, match="3 non-finite updates in a row up to step 3"):
        trainer.run()


def test_an_out_of_memory_batch_is_skipped_and_max_frames_shrinks(
    tmp_path, corpus, lang, monkeypatch, caplog
):
    original = AsrModel.forward
    raised = []

    def forward(self, batch):
        if batch.index == 4 and not raised:
            raised.append(batch.index)
            raise RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 GB"
            )
        return original(self, batch)

    monkeypatch.setattr(AsrModel, "forward", forward)
    trainer = _in_process(
        tmp_path, corpus, lang, train={"max_steps": 12, "valid_every": None, "oom_shrink": 0.5}
    )
    assert trainer.run() == 0
    assert (
        "step 3: out of memory on batch 4" in caplog.text
        and "max_frames becomes 750 from the next epoch" in caplog.text
    )
    assert trainer.max_frames == 750
    assert trainer.train_loader.sampler.max_frames == 750  # epoch 1 was planned with it


def test_an_all_skipped_batch_changes_nothing(tmp_path, corpus, lang):
    """A batch whose every utterance was skipped still runs every parameter (other ranks
    wait for its gradients), on a model with BatchNorm, and leaves weights, gradients and
    statistics as they were. Its one utterance is as short as training allows: two
    encoder frames, since BatchNorm refuses a one-utterance batch of one frame."""
    trainer = _in_process(tmp_path, corpus, lang)
    trainer._setup()
    module = trainer.model
    shortest = torch.tensor([trainer._min_frames])
    assert module.encoder.subsampling.output_lengths(shortest).item() == 2
    assert module.encoder.subsampling.output_lengths(shortest - 1).item() == 1
    # the shortest utterance training keeps still has them after the fastest speed (1.1)
    seconds = trainer.train_loader.dataset.config.min_duration
    fastest = speed_perturb(np.ones(math.ceil(seconds * 16000), np.float32), 16000, 1.1)
    assert FbankConfig().num_frames(len(fastest), 16000) >= trainer._min_frames
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.train()
    trainer._dummy_backward()
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert all(p.grad is None or not p.grad.any() for p in module.parameters())


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process_and_resumes_on_one(tmp_path, corpus, lang):
    one = write_config(tmp_path, corpus, lang, train={"max_steps": 8, "valid_every": None})
    exp_one = tmp_path / "one"
    assert echoic("train", str(one), "--exp", str(exp_one), "--no-progress").returncode == 0
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    two = write_config(
        two_dir,
        corpus,
        lang,
        train={"max_steps": 5, "accum_grad": 1, "valid_every": None, "num_threads": 1},
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29571",
        "-m",
        "echoic",
        "train",
        str(two),
        "--exp",
        str(two_dir / "exp"),
        "--no-progress",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # Resume the 2-process run on one process: accum_grad 2 keeps the global batch of 2.
    done = echoic("train", str(one), "--exp", str(two_dir / "exp"), "--no-progress")
    assert done.returncode == 0 and "resuming from" in done.stderr, done.stderr[-3000:]

    def losses(exp):
        lines = [json.loads(line) for line in deterministic_lines(exp)]
        return [r["loss"] for r in lines if r["split"] == "train"]

    single, distributed = losses(exp_one), losses(two_dir / "exp")
    assert len(single) == len(distributed) == 8
    for a, b in zip(single, distributed):
        assert abs(a - b) <= 1e-4 * abs(a)


def test_plot_average_and_tensorboard(tmp_path, corpus, lang):
    trainer = _in_process(
        tmp_path, corpus, lang, train={"max_steps": 6, "save_every_steps": 2, "valid_every": 2}
    )
    assert trainer.run() == 0
    exp = tmp_path / "exp"
    done = echoic("plot", "--exp", str(exp))
    assert done.returncode == 0 and (exp / "curves.png").stat().st_size > 10_000
    done = echoic("average", "--exp", str(exp), "--last", "2")
    assert done.returncode == 0, done.stderr
    averaged = load_file(exp / "average-last-2.safetensors")
    last = [load_file(p / "model.safetensors") for p in list_checkpoints(exp / "checkpoints")[-2:]]
    key = "ctc.proj.weight"
    torch.testing.assert_close(averaged[key], (last[0][key] + last[1][key]) / 2)
    done = echoic(
        "average", "--exp", str(exp), "--best", "2", "--metric", "th_accuracy", "--mode", "max"
    )
    assert done.returncode == 0 and "averaged 2 checkpoints" in done.stdout
    assert any((exp / "tensorboard").iterdir())
    assert (
        (exp / "tokenizer.json").is_file()
        and (exp / "cmvn.json").is_file()
        and (exp / "config.yaml").is_file()
    )


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_still_saves(tmp_path, corpus, lang):
    # timeout(1) and batch schedulers signal every process of the group, data workers too.
    config = write_config(tmp_path, corpus, lang, data={"num_workers": 2})
    exp = tmp_path / "exp"
    process = start_paused(config, exp, "5:1", new_session=True)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "step-00000005 saved (stop (SIGTERM))" in stderr
