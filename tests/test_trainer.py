"""The trainer: exact resume after SIGKILL or SIGTERM, corrupt checkpoints, config
checks, bad steps, out-of-memory batches, DDP on two processes, plots and averaging."""

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import (
    Killed,
    assert_same_run,
    deterministic_lines,
    echoic,
    final_weights,
    start_paused,
    stop_at,
    write_config,
)
from safetensors.torch import load_file

from echoic.data.augment import speed_perturb
from echoic.data.features import FbankConfig
from echoic.data.manifest import read_manifest, write_manifest
from echoic.errors import ConfigError, EchoicError
from echoic.models.asr import AsrModel
from echoic.models.contract import Metric
from echoic.train.checkpoint import (
    CheckpointError,
    average_weights,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from echoic.train.config import TrainConfig, breaking_changes, load_experiment
from echoic.train.metrics import MetricSums
from echoic.train.trainer import Trainer, TrainingAborted

# Epoch 0 of the session corpus is 20 batches of max_frames 1500: 10 steps of 2 micro-batches.
KILL_POINTS = ("3:1", "epoch-end:0", "12:0")  # mid-accumulation, epoch boundary, mid-epoch


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
    # One line naming the key, a close match and the section's keys, whichever they are.
    allowed = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
    assert done.stderr.strip().splitlines() == [
        f"echoic: error: {config}: unknown key 'train.max_step'; did you mean 'max_steps'? "
        f"(allowed in 'train': {allowed})"
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
        # In process: `echoic train --set` reads overrides through load_experiment, and
        # the one-line CLI form of its errors is checked above (a process each cost 25 s).
        with pytest.raises(ConfigError) as error:
            load_experiment(good, [override])
        assert message in str(error.value) and "\n" not in str(error.value)
    overrides = [
        "data.feature_cache=true",
        "data.num_workers=2",
        "model.frontend.fbank.fbank.dither=1",
    ]
    with pytest.raises(ConfigError, match=r"data\.feature_cache needs .*dither 0") as error:
        load_experiment(good, overrides)
    assert "\n" not in str(error.value)
    raw = yaml.safe_load(good.read_text())
    del raw["data"]["lang"]
    good.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"missing required key 'data\.lang'"):
        load_experiment(good)


@pytest.mark.slow
def test_config_changes_on_resume(tmp_path, corpus, lang, caplog):
    config = write_config(tmp_path, corpus, lang, train={"max_steps": 3})
    exp = tmp_path / "exp"

    def run(*overrides: str, allow: bool = False) -> int:
        # In process (a subprocess each cost 5 s); the CLI's form is checked once below.
        experiment = load_experiment(config, list(overrides))
        return Trainer(experiment, exp, allow_config_change=allow, progress=False).run()

    assert run() == 0
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
    with caplog.at_level(logging.WARNING, logger="echoic"):
        assert run("train.max_steps=4") == 0
    assert "resuming with a changed config: train.max_steps: 3 -> 4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="echoic"):
        assert run("optim.lr=0.01", "train.max_steps=5", allow=True) == 0
    assert "optim.lr: 0.002 -> 0.01" in caplog.text
    assert "lr: 0.01" in (exp / "config.yaml").read_text()  # the saved config follows the run
    # Another architecture: one line, even with --allow-config-change (a traceback of
    # size mismatches before).
    with pytest.raises(EchoicError) as error:
        run("model.encoder.conformer.d_model=48", "train.max_steps=6", allow=True)
    message = str(error.value)
    assert "step-00000005: its weights do not fit the model the config builds now" in message
    assert "of other shape (first encoder.subsampling.convs.0.weight [32, 1, 3, 3] in" in message
    assert "a resume cannot change the architecture" in message and "\n" not in message
    assert "d_model: 32" in (exp / "config.yaml").read_text()  # the refused run wrote nothing
    assert run("optim.lr=0.01", "train.max_steps=6") == 0  # and the run goes on as it was


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
    # num_threads as in the two-process run: another count would change float rounding
    one = write_config(
        tmp_path, corpus, lang, train={"max_steps": 8, "valid_every": None, "num_threads": 1}
    )
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
        "--standalone",  # a free port: tests may run side by side
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


def _run_state(exp: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    return final_weights(exp), deterministic_lines(exp)


def _oom_on(monkeypatch, epoch: int, index: int) -> None:
    """Batch `index` of `epoch` runs out of memory every time it is computed."""
    original = AsrModel.forward

    def forward(self, batch):
        if self.training and (batch.epoch, batch.index) == (epoch, index):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 99 GB")
        return original(self, batch)

    monkeypatch.setattr(AsrModel, "forward", forward)


@pytest.mark.slow
def test_resume_after_an_out_of_memory_shrink_is_exact(tmp_path, corpus, lang, monkeypatch, caplog):
    """The shrunk max_frames is for the epochs after the out-of-memory batch: a resume
    rebuilds the running epoch's batches as they were planned, and one that recomputes
    the batch shrinks the budget once, not twice."""
    caplog.set_level(logging.INFO, logger="echoic")
    _oom_on(monkeypatch, epoch=0, index=4)  # the window of step 3
    train = {"max_steps": 14, "valid_every": 5, "oom_shrink": 0.5}  # 10 steps an epoch
    reference = _in_process(tmp_path / "reference", corpus, lang, train=train)
    assert reference.run() == 0
    assert "max_frames becomes 750 from the next epoch" in caplog.text
    assert reference.train_loader.sampler.max_frames == 750  # epoch 1 was planned with it
    expected_weights, expected_lines = _run_state(tmp_path / "reference" / "exp")
    for where, how in [
        ("4:1", "kill"),  # resumes from step 3's checkpoint, saved after the shrink
        ("2:1", "stop"),  # saves step 2's boundary, before the batch that ran out of memory
    ]:
        folder = tmp_path / how
        trainer = _in_process(folder, corpus, lang, train=train)
        stop_at(trainer, where, how)
        if how == "kill":
            with pytest.raises(Killed):
                trainer.run()
        else:
            assert trainer.run() == 0
        caplog.clear()
        resumed = _in_process(folder, corpus, lang, train=train)
        assert resumed.run() == 0
        assert "resuming from" in caplog.text
        assert resumed.max_frames == 750, how
        weights, lines = _run_state(folder / "exp")
        assert lines == expected_lines, how
        assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights), how


@pytest.mark.slow
def test_an_epochs_last_step_is_validated_once_and_averaged_once(tmp_path, corpus, lang):
    """Step 10 ends epoch 0 and is a multiple of valid_every: one dev line, not two; and
    `average --best` takes each checkpoint once even when metrics.jsonl has a step twice
    (as runs before this fix wrote)."""
    trainer = _in_process(tmp_path, corpus, lang, train={"max_steps": 10, "valid_every": 5})
    assert trainer.run() == 0
    exp = tmp_path / "exp"
    dev = [json.loads(line) for line in deterministic_lines(exp) if '"dev"' in line]
    assert [(r["step"], r["epoch"]) for r in dev] == [(5, 0), (10, 0)]
    best = min(dev, key=lambda r: r["loss"])
    with (exp / "metrics.jsonl").open("a") as stream:
        stream.write(json.dumps(best) + "\n")
    done = echoic("average", "--exp", str(exp), "--best", "2")
    assert done.returncode == 0, done.stderr
    assert "averaged 2 checkpoints (step-00000005, step-00000010)" in done.stdout or (
        "averaged 2 checkpoints (step-00000010, step-00000005)" in done.stdout
    ), done.stdout
    newest = list_checkpoints(exp / "checkpoints")[-1]
    with pytest.raises(CheckpointError, match="more than once"):
        average_weights([newest, newest])


def test_a_window_of_skipped_utterances_is_not_a_bad_step(tmp_path, corpus, lang, caplog):
    """Every utterance of step 1's two batches has its audio missing: a skip, counted
    as one, not a non-finite update toward max_bad_steps."""
    plan = _in_process(tmp_path / "plan", corpus, lang)
    plan._setup()
    plan.metrics_log.close()
    first = {i for batch in plan.train_loader.sampler.epoch_batches(0)[:2] for i in batch}
    utterances = read_manifest(corpus / "train.jsonl").utterances
    missing = str(tmp_path / "missing.wav")
    broken = [
        dataclasses.replace(u, audio=missing) if i in first else u for i, u in enumerate(utterances)
    ]
    write_manifest(tmp_path / "train.jsonl", broken)
    trainer = _in_process(
        tmp_path,
        corpus,
        lang,
        data={"train": str(tmp_path / "train.jsonl")},
        train={"max_steps": 2, "max_bad_steps": 1, "valid_every": None},
    )
    assert trainer.run() == 0
    assert "step 1: every utterance of its batches was skipped: no update" in caplog.text
    assert "non-finite" not in caplog.text and trainer.bad_steps == 0


def test_utterances_ctc_cannot_align_are_counted_as_skips(tmp_path, corpus, lang, caplog):
    """An utterance whose transcript is too long for its audio (three copies of it) is
    left out of the loss and reported as a skip, in training and on dev."""
    utterances = read_manifest(corpus / "train.jsonl").utterances
    easy = sorted(utterances, key=lambda u: len(u.text) / u.duration)[:8]
    bad = dataclasses.replace(easy[3], text=" ".join([easy[3].text] * 3))
    write_manifest(tmp_path / "small.jsonl", [*easy[:3], bad, *easy[4:]])
    small = str(tmp_path / "small.jsonl")
    trainer = _in_process(
        tmp_path,
        corpus,
        lang,
        data={"train": small, "dev": small, "speed_perturb": [1.0]},
        train={"max_steps": None, "max_epochs": 1, "accum_grad": 1, "valid_every": None},
    )
    assert trainer.run() == 0
    left_out = f"the model left out 1 utterances, as skips (1 no_ctc_alignment, first {bad.id} "
    assert f"train epoch 0: {left_out}" in caplog.text
    assert f"dev at step {trainer.step}: {left_out}" in caplog.text
    assert "non-finite" not in caplog.text
    dev = [json.loads(line) for line in deterministic_lines(tmp_path / "exp") if '"dev"' in line]
    assert len(dev) == 1 and math.isfinite(dev[0]["loss_ctc"])


def test_which_config_changes_break_exact_resume(tmp_path, corpus, lang):
    path = write_config(tmp_path, corpus, lang)  # the noam schedule: max_steps is only a limit
    base = load_experiment(path)
    cosine = load_experiment(path, ["optim.scheduler=cosine"])
    assert breaking_changes(base, load_experiment(path, ["train.max_steps=20"])) == {}
    assert breaking_changes(
        cosine, load_experiment(path, ["optim.scheduler=cosine", "train.max_steps=20"])
    ) == {"train.max_steps": "which is the cosine schedule's length"}
    assert breaking_changes(base, load_experiment(path, ["train.num_threads=1"])) == {
        "train.num_threads": "which changes float rounding"
    }
    assert breaking_changes(base, load_experiment(path, ["train.max_epochs=3"])) == {}
    # On resume: one line naming the key and why.
    trainer = _in_process(
        tmp_path / "a", corpus, lang, optim={"scheduler": "cosine"}, train={"max_steps": 2}
    )
    assert trainer.run() == 0
    trainer = _in_process(
        tmp_path / "a", corpus, lang, optim={"scheduler": "cosine"}, train={"max_steps": 4}
    )
    with pytest.raises(ConfigError) as error:
        trainer.run()
    assert str(error.value).startswith(
        "the config changed in ways that break exact resume "
        "(train.max_steps, which is the cosine schedule's length); "
        "pass --allow-config-change to resume anyway. Changes: train.max_steps: 2 -> 4"
    )
    assert "\n" not in str(error.value)


def test_metric_sums_report_every_declared_key():
    """A window with no data (a rank with no dev batch) still has every key, None, and
    packs the same values as any other window: ranks enter the same collective."""
    sums = MetricSums({"loss": "utterances", "loss_ctc": "utterances", "loss_rnnt": "utterances"})
    assert sums.reduced(None) == {"loss": None, "loss_ctc": None, "loss_rnnt": None}
    sums.add({"loss": Metric(6.0, 3.0, "utterances"), "loss_ctc": None, "loss_rnnt": None})
    assert sums.reduced(None) == {"loss": 2.0, "loss_ctc": None, "loss_rnnt": None}
    with pytest.raises(ValueError, match="not among"):
        sums.add({"wer": Metric(1.0, 1.0, "tokens")})


@pytest.mark.slow
def test_validation_on_two_processes_with_a_one_batch_dev_set(tmp_path, corpus, lang):
    """Rank 1 gets no dev batch: it must still enter the collectives rank 0 enters (a
    hang or a crash before). The timeout turns a hang into a failure."""
    dev = read_manifest(corpus / "dev.jsonl").utterances[:1]
    write_manifest(tmp_path / "dev1.jsonl", dev)
    config = write_config(
        tmp_path,
        corpus,
        lang,
        data={"dev": str(tmp_path / "dev1.jsonl")},
        train={"max_steps": 2, "accum_grad": 1, "valid_every": 1, "num_threads": 1},
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    command += [
        "-m",
        "echoic",
        "train",
        str(config),
        "--exp",
        str(tmp_path / "exp"),
        "--no-progress",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks
        process.communicate()
        raise AssertionError("two-process training with a one-batch dev set hung") from None
    assert process.returncode == 0, stderr[-3000:]
    dev_lines = [
        json.loads(line) for line in deterministic_lines(tmp_path / "exp") if '"dev"' in line
    ]
    assert [r["step"] for r in dev_lines] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in dev_lines)


def test_a_version_1_checkpoint_resumes_and_best_metric_is_checked_first(tmp_path, corpus, lang):
    trainer = _in_process(tmp_path, corpus, lang, train={"max_steps": 2, "valid_every": None})
    assert trainer.run() == 0
    # Rewrite the checkpoint as version 1 wrote it: one max_frames, no left-out counts,
    # metric sums None for the heads the model does not have.
    path = list_checkpoints(tmp_path / "exp" / "checkpoints")[-1]
    weights, state = load_checkpoint(path)
    del state["epoch_max_frames"], state["dropped"]
    state["version"] = 1
    state["tracker"]["sums"]["loss_rnnt"] = None
    shutil.rmtree(path)
    save_checkpoint(path.parent, 2, weights, state)
    trainer = _in_process(tmp_path, corpus, lang, train={"max_steps": 3, "valid_every": None})
    assert trainer.run() == 0 and trainer.step == 3
    trainer = _in_process(tmp_path / "b", corpus, lang, train={"best_metric": "wer"})
    with pytest.raises(
        ConfigError, match=r"train\.best_metric 'wer' is not a metric of this model"
    ):
        trainer.run()
    assert not list_checkpoints(tmp_path / "b" / "exp" / "checkpoints")  # before any step


@pytest.mark.slow
def test_a_compiled_run_killed_and_resumed_is_bit_identical(tmp_path, corpus, lang, caplog):
    """train.compile: blocks compiled with dynamic shapes from the first batch, so the
    resumed run (whose first batch has another shape) runs the same kernels; Inductor's
    dropout masks come from the global RNG, which the checkpoint restores. The
    bucketed batches of an epoch compile each graph once: no recompiles."""
    caplog.set_level(logging.INFO, logger="echoic")
    train = {"max_steps": 8, "valid_every": 4, "compile": True}
    reference = _in_process(tmp_path / "reference", corpus, lang, train=train)
    assert reference.run() == 0
    assert "train.compile: 1 encoder blocks compiled" in caplog.text
    folder = tmp_path / "killed"
    trainer = _in_process(folder, corpus, lang, train=train)
    stop_at(trainer, "5:1", "kill")  # after step 3's checkpoint, mid-accumulation
    with pytest.raises(Killed):
        trainer.run()
    caplog.clear()
    assert _in_process(folder, corpus, lang, train=train).run() == 0
    assert "resuming from" in caplog.text
    assert_same_run(folder / "exp", tmp_path / "reference" / "exp")
    from echoic.train.compiled import compile_counts

    assert compile_counts()["recompiles"] <= 2  # train/eval mode and grad on/off, not shapes


def test_compile_falls_back_to_eager_with_one_line_where_unavailable(monkeypatch, caplog):
    from echoic.train import compiled

    monkeypatch.setenv("CXX", "no-such-compiler-here")
    blocks = [torch.nn.Linear(2, 2)]
    assert compiled.compile_blocks(blocks, torch.device("cpu")) is False
    assert "train.compile: Inductor's CPU code needs a C++ compiler" in caplog.text
    assert "training without it" in caplog.text
