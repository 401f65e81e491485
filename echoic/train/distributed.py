"""Process setup for single-process and torchrun runs (DDP or FSDP2), and the few
collectives the trainer needs. torch.distributed does all of the work.

Under `torchrun --nproc_per_node=N -m echoic train ...` the environment names the
rank and world size; NCCL is used on CUDA, gloo on CPU. Multi-node runs use
torchrun's own rendezvous (--nnodes, --rdzv-backend c10d, --rdzv-endpoint HOST:PORT).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from echoic.errors import EchoicError


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str, deterministic: bool, num_threads: int | None) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EchoicError("train.device is cuda but no CUDA device is available")
    torch_device = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(torch_device)
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Runtime(rank, world_size, local_rank, torch_device)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Sum across ranks, in place (a no-op in one process)."""
    if runtime.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """True when `flag` is true on any rank, so every rank takes the same decision."""
    if not runtime.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=runtime.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def wrap(model: nn.Module, runtime: Runtime, mode: str) -> nn.Module:
    """DDP or FSDP2 around `model` under torchrun; the model itself in one process."""
    if not runtime.distributed:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # FSDP shards flat, contiguous parameters: undo the subsampling's channels_last
        # weight layout (a CPU speed choice; FSDP runs are GPU runs).
        for parameter in model.parameters():
            parameter.data = parameter.data.contiguous()
        for block in model.repeated_blocks():
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    # Not rank 0's buffers before every forward (a collective per micro-batch, and rank
    # 0's BatchNorm statistics alone): BatchNormStatistics gives every rank those of all
    # ranks' batches at each optimizer step. Set as an attribute, which every torch
    # version reads (the argument is renamed in 2.13); the broadcast at construction
    # still happens.
    ddp.broadcast_buffers = False
    return ddp


class BatchNormStatistics:
    """BatchNorm running statistics under torchrun: at each optimizer step every rank
    ends with those one process would have, had it taken the step's batches in order.

    Each rank updates its own statistics on its own micro-batches (DDP no longer
    broadcasts rank 0's, and FSDP2 never did). After each micro-batch, a rank records,
    per norm, the batch statistic s and the number of updates c the forward (and a
    gradient-checkpointing recompute) made: new = (1 - w) * old + w * s, with w =
    1 - (1 - momentum)^c, or c / (n + c) for a cumulative average (momentum None).
    `synchronize` gathers every rank's records and replays them, in float64 and in
    global batch order, from the statistics all ranks held at the step's start: the
    same sequence of updates as in one process, so the statistics are those of one
    process up to float rounding (not to the bit: s is recovered from the float32
    update, and one process rounds after every update). Every rank computes the same
    replay from the same records, so all hold identical statistics at the step
    boundary, where the trainer's snapshot (and so a checkpoint) takes them, and a
    resumed run continues from exactly what the uninterrupted one did.

    SyncBatchNorm would not do: it normalises with statistics over all ranks' batches,
    so training itself would compute other things than one process does (and it
    refuses CPU tensors, so gloo runs). Averaging the ranks' statistics at each step
    would be simpler, but makes world_size times fewer updates than one process: in
    tests/test_distributed.py that left them as far from one process's (0.10 in a mean,
    0.23 in a variance) as rank 0's alone (0.11, 0.23); the replay, 3e-8 and 6e-8.

    In one process every method is a no-op: training is unchanged to the bit.
    """

    def __init__(self, model: nn.Module, runtime: Runtime) -> None:
        self.norms = [
            module
            for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
        ]
        self.runtime = runtime
        self.active = runtime.distributed and bool(self.norms)
        self.records: list[torch.Tensor] = []
        self.start: tuple[torch.Tensor, torch.Tensor] | None = None

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(every norm's running mean and variance in one float64 row, their counters)."""
        stats = [torch.cat([m.running_mean, m.running_var]) for m in self.norms]
        counts = torch.stack([m.num_batches_tracked for m in self.norms])
        return torch.cat(stats).double(), counts.double()

    def _weights(self, counts: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        """w of each norm's `updates` updates from counter `counts`, one per statistic."""
        weights = []
        for module, n, c in zip(self.norms, counts.tolist(), updates.tolist(), strict=True):
            if c == 0:
                w = 0.0
            elif module.momentum is None:
                w = c / (n + c)
            else:
                w = 1.0 - (1.0 - module.momentum) ** c
            weights.append(torch.full((2 * module.num_features,), w, dtype=torch.float64))
        return torch.cat(weights).to(counts.device)

    @contextlib.contextmanager
    def micro_batch(self, index: int) -> Iterator[None]:
        """Record what the forward and backward inside make of global batch `index`."""
        if not self.active:
            yield
            return
        with torch.no_grad():
            before, counts = self._read()
        if self.start is None:  # the step's first micro-batch: every rank holds the same
            self.start = before, counts
        yield
        with torch.no_grad():
            after, after_counts = self._read()
            updates = after_counts - counts
            weights = self._weights(counts, updates)
            ran = weights > 0
            batch = torch.where(ran, before + (after - before) / torch.where(ran, weights, 1.0), 0)
            index_row = torch.tensor([float(index)], dtype=torch.float64, device=batch.device)
            self.records.append(torch.cat([index_row, updates, batch]))

    def synchronize(self) -> None:
        """At an optimizer step: every rank's statistics become the replay of all records.
        A collective: every rank calls it after the same number of micro-batches (their
        gradient all-reduce already requires that)."""
        if not self.active or not self.records:
            return
        local = torch.stack(self.records)
        gathered = [torch.empty_like(local) for _ in range(self.runtime.world_size)]
        dist.all_gather(gathered, local)
        records = torch.cat(gathered)
        records = records[records[:, 0].argsort(stable=True)]
        assert self.start is not None
        stats, counts = self.start
        norms = len(self.norms)
        with torch.no_grad():
            for row in records:
                updates, batch = row[1 : 1 + norms], row[1 + norms :]
                stats = stats + self._weights(counts, updates) * (batch - stats)
                counts = counts + updates
            offset = 0
            for module, count in zip(self.norms, counts.tolist(), strict=True):
                size = module.num_features
                module.running_mean.copy_(stats[offset : offset + size])
                module.running_var.copy_(stats[offset + size : offset + 2 * size])
                module.num_batches_tracked.fill_(int(count))
                offset += 2 * size
        self.records, self.start = [], None


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded weights of the unwrapped model (a collective under FSDP)."""
    if is_fsdp(model):
        return get_model_state_dict(model, options=_FULL)
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    if is_fsdp(model):
        set_model_state_dict(
            model, weights, options=StateDictOptions(full_state_dict=True, strict=True)
        )
        return
    unwrap(model).load_state_dict(weights, strict=True)  # a missing or extra key raises


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimizer state keyed by parameter name (not position), the same format in
    one process, under DDP and under FSDP: a checkpoint resumes in any of them."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
