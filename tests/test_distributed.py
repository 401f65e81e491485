"""Training on two gloo processes (torchrun on CPU) and in bf16 on CPU: DDP ends with the
weights of one process, FSDP2 resumes exactly after a kill, bf16 autocast trains.

Every multi-process run is bounded by RUN_TIMEOUT_S: a hang (a rank waiting forever in
a collective) kills the launcher and its ranks and fails the test instead of blocking CI.
"""

import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import deterministic_lines, final_weights, write_config

from echoic.train.config import load_experiment
from echoic.train.distributed import BatchNormStatistics, Runtime
from echoic.train.trainer import Trainer

RUN_TIMEOUT_S = 300  # one torchrun launch; a normal one takes well under a minute here
# The conformer's convolution module uses BatchNorm: its running statistics are buffers
# (see test_ddp_keeps_the_batch_norm_statistics_of_every_rank).
BATCH_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _torchrun_command(config: Path, exp: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port of its own: tests may run side by side
        "--nproc_per_node=2",
        "-m",
        "echoic",
        "train",
        str(config),
        "--exp",
        str(exp),
        "--no-progress",
    ]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (torchrun starts each rank in a session of
    its own, so killing the launcher's process group leaves the ranks running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name, in parentheses, may hold spaces: split after it.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_all(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank, and reap the launcher."""
    for pid in [process.pid, *_descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=60)


def torchrun(config: Path, exp: Path) -> str:
    """Train on two processes; the launcher's stderr. Fails the test on an error or when
    the run outlives RUN_TIMEOUT_S (the launcher and both ranks are killed)."""
    process = subprocess.Popen(
        _torchrun_command(config, exp),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_all(process)
        pytest.fail(f"torchrun did not finish in {RUN_TIMEOUT_S} s (a hung collective?)")
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def torchrun_killed_at(config: Path, exp: Path, where: str) -> None:
    """Train on two processes until a rank reaches `where` (see PausePoint), then SIGKILL
    the launcher and both ranks: no chance to save anything."""
    process = subprocess.Popen(
        _torchrun_command(config, exp),
        env={**os.environ, "ECHOIC_PAUSE_AT": where},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (exp / "paused").exists():
        if process.poll() is not None:
            raise AssertionError(f"training ended before {where}: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            _kill_all(process)
            pytest.fail(f"torchrun did not reach {where} in {RUN_TIMEOUT_S} s")
        time.sleep(0.05)
    _kill_all(process)
    (exp / "paused").unlink()


def single_process(config: Path, exp: Path) -> None:
    assert Trainer(load_experiment(config), exp, progress=False).run() == 0


def _split(weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(parameters and constant buffers, BatchNorm running statistics)."""
    stats = {k: v for k, v in weights.items() if k.endswith(BATCH_NORM_STATS)}
    return {k: v for k, v in weights.items() if k not in stats}, stats


def _different(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    assert got.keys() == expected.keys()
    return [k for k in expected if not torch.equal(got[k], expected[k])]


# Four steps of a global batch of two: one process accumulates two micro-batches, two
# processes take one each. No validation: it would only add time (4 steps end before
# the first epoch does).
STEPS = 4


def _ddp_and_single(tmp_path: Path, corpus: Path, lang: Path) -> tuple[Path, Path]:
    common = {"max_steps": STEPS, "valid_every": None, "save_every_steps": None}
    # One thread in both: intra-op threads split reductions differently and change float
    # rounding (the reason train.num_threads breaks exact resume).
    one = write_config(
        tmp_path / "one", corpus, lang, train={**common, "accum_grad": 2, "num_threads": 1}
    )
    two = write_config(
        tmp_path / "two", corpus, lang, train={**common, "accum_grad": 1, "num_threads": 1}
    )
    single_process(one, tmp_path / "one" / "exp")
    torchrun(two, tmp_path / "two" / "exp")
    return tmp_path / "one" / "exp", tmp_path / "two" / "exp"


@pytest.fixture(scope="module")
def ddp_and_single(tmp_path_factory, corpus, lang) -> tuple[Path, Path]:
    return _ddp_and_single(tmp_path_factory.mktemp("ddp"), corpus, lang)


@pytest.mark.slow
def test_ddp_on_two_processes_ends_with_the_weights_of_one_process(ddp_and_single):
    # torch.equal, not allclose: each parameter's gradient is g0 + g1 either way (autograd
    # accumulation in one process; DDP divides each rank's by 2 and all-reduces, and
    # the trainer multiplies by 2 again, all exact powers of two; a two-term float sum
    # does not depend on its order). Forward passes run the same micro-batches with the
    # same dropout (reseeded per global batch index), so nothing may differ.
    one, two = ddp_and_single
    single, distributed = _split(final_weights(one)), _split(final_weights(two))
    assert not _different(distributed[0], single[0]), "parameters differ"
    lines = [json.loads(line) for line in deterministic_lines(two)]
    assert [r["step"] for r in lines if r["split"] == "train"] == list(range(1, STEPS + 1))
    assert deterministic_lines(two) == deterministic_lines(one)


@pytest.mark.slow
def test_ddp_keeps_the_batch_norm_statistics_of_every_rank(ddp_and_single):
    # Close, not equal: the ranks' updates are replayed in one process's order from
    # the batch statistics they recover from their float32 updates (see
    # BatchNormStatistics). Measured: 3e-8 in a mean, 6e-8 in a variance (one or two
    # float32 ulps of values below 0.5); rank 0's statistics alone, as DDP saved them
    # before, were 0.11 and 0.23 off, with half the updates counted.
    one, two = ddp_and_single
    single, distributed = _split(final_weights(one))[1], _split(final_weights(two))[1]
    assert single, "the test config has no BatchNorm: this test checks nothing"
    counters = [k for k in single if k.endswith("num_batches_tracked")]
    assert {k: int(distributed[k]) for k in counters} == {k: 2 * STEPS for k in counters}
    torch.testing.assert_close(distributed, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("passes", [1, 2])  # 2: a gradient-checkpointing recompute
def test_batch_norm_statistics_replay_one_process_on_every_rank(monkeypatch, momentum, passes):
    """Two ranks of two micro-batches each (global batches r, 2 + r on rank r), for two
    steps, against one process taking the four batches of each step in order. The
    second norm skips batch 1 (a module that did not run: no update)."""
    torch.manual_seed(0)
    model = torch.nn.ModuleList(torch.nn.BatchNorm1d(3, momentum=momentum) for _ in range(2))
    batches = [torch.randn(4, 3, 5) * (i + 1) + i for i in range(8)]

    def forward(replica: torch.nn.ModuleList, index: int) -> None:
        for _ in range(passes):
            for number, norm in enumerate(replica):
                if not (number == 1 and index % 4 == 1):
                    norm(batches[index])

    ranks = [copy.deepcopy(model) for _ in range(2)]
    stats = [
        BatchNormStatistics(replica, Runtime(rank, 2, rank, torch.device("cpu")))
        for rank, replica in enumerate(ranks)
    ]

    gathered: list[torch.Tensor] = []  # each rank's records, as all_gather sees them

    def all_gather(tensors: list[torch.Tensor], tensor: torch.Tensor) -> None:
        assert any(torch.equal(tensor, g) for g in gathered)
        for target, source in zip(tensors, gathered, strict=True):
            target.copy_(source)

    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    for step in range(2):
        for index in range(4 * step, 4 * step + 4):
            forward(model, index)
        for rank, (replica, rank_stats) in enumerate(zip(ranks, stats, strict=True)):
            for index in (4 * step + rank, 4 * step + 2 + rank):
                with rank_stats.micro_batch(index):
                    forward(replica, index)
        gathered[:] = [torch.stack(s.records) for s in stats]
        for rank_stats in stats:
            rank_stats.synchronize()
    expected = model.state_dict()
    first, second = (replica.state_dict() for replica in ranks)
    assert not _different(second, first), "the ranks hold different statistics"
    assert int(first["1.num_batches_tracked"]) == 6 * passes
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)  # measured: 1 ulp


@pytest.mark.slow
def test_fsdp2_on_two_processes_resumes_exactly_after_a_kill(
    tmp_path, corpus, lang, ddp_and_single
):
    train = {
        "max_steps": STEPS,
        "valid_every": None,
        "save_every_steps": 2,
        "accum_grad": 1,
        "num_threads": 1,
        "distributed": "fsdp",
    }
    config = write_config(tmp_path, corpus, lang, train=train)
    reference, exp = tmp_path / "reference", tmp_path / "exp"
    torchrun(config, reference)
    # Killed after step 3, between the checkpoints of steps 2 and 4: the resumed run
    # loads the sharded model and optimizer from step 2's full state and redoes step 3.
    torchrun_killed_at(config, exp, "3:0")
    assert [p.name for p in (exp / "checkpoints").iterdir()] == ["step-00000002"]
    stderr = torchrun(config, exp)
    assert "resuming from" in stderr and "step-00000002" in stderr, stderr[-3000:]
    got, expected = final_weights(exp), final_weights(reference)
    assert not _different(got, expected), "the resumed FSDP2 run ends with other weights"
    assert deterministic_lines(exp) == deterministic_lines(reference)
    # FSDP2 also trains like one process, but not to the bit as DDP does: the step-1
    # losses are equal and the gradient norms already differ by 6e-6 (relative), so the
    # gradients round differently, most likely because wrap() makes the subsampling's
    # channels_last weights contiguous under FSDP (another conv kernel) and the norm is
    # summed over shards; clipping (norm ~100 > 5) then scales every update by it. After
    # 4 steps the largest difference was 4.4e-6; since the linear layers' products run
    # in oneDNN it is 2.5e-5, in one of the subsampling linear's 19,456 weights (Adam
    # turns tiny gradient differences of near-zero gradients into whole updates).
    single = _split(final_weights(ddp_and_single[0]))
    torch.testing.assert_close(_split(expected)[0], single[0], rtol=1e-4, atol=5e-5)
    # Its BatchNorm statistics are one process's too (see the DDP test), up to what
    # those small weight differences change in the batches' statistics: measured 2.1e-7
    # in a mean, 6e-8 in a variance (rank 0's alone, as saved before: 0.11 and 0.23).
    torch.testing.assert_close(_split(expected)[1], single[1], rtol=1e-5, atol=5e-6)


@pytest.mark.slow
def test_bf16_autocast_trains_on_cpu(tmp_path, corpus, lang, ddp_and_single):
    # The one-process fp32 run of the DDP test is the reference: same data, same steps.
    train = {
        "max_steps": 2,
        "accum_grad": 2,
        "num_threads": 1,
        "valid_every": 2,  # validation runs under autocast too
        "save_every_steps": None,
        "precision": "bf16",
    }
    exp = tmp_path / "exp"
    single_process(write_config(tmp_path, corpus, lang, train=train), exp)
    records = [json.loads(line) for line in deterministic_lines(exp)]
    reference = [json.loads(line) for line in deterministic_lines(ddp_and_single[0])]
    fp32 = {r["step"]: r["loss"] for r in reference if r["split"] == "train"}
    bf16 = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    assert sorted(bf16) == [1, 2]
    for step, loss in bf16.items():
        # Not equal (else autocast did nothing), but close: the heads compute their
        # losses in float32 (measured: 9e-5 relative at step 1).
        assert loss != fp32[step] and loss == pytest.approx(fp32[step], rel=2e-3), step
    dev = [r for r in records if r["split"] == "dev"]
    assert len(dev) == 1 and all(
        v is None or math.isfinite(v) for k, v in dev[0].items() if k != "split"
    )
    weights = final_weights(exp)  # the master weights stay float32
    assert {v.dtype for k, v in weights.items() if v.is_floating_point()} == {torch.float32}
