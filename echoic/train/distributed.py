"""Process setup for single-process and torchrun runs (DDP or FSDP2), and the few
collectives the trainer needs. torch.distributed does all of the work.

Under `torchrun --nproc_per_node=N -m echoic train ...` the environment names the
rank and world size; NCCL is used on CUDA, gloo on CPU. Multi-node runs use
torchrun's own rendezvous (--nnodes, --rdzv-backend c10d, --rdzv-endpoint HOST:PORT).
"""

from __future__ import annotations

import os
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
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


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
