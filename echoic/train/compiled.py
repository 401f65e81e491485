"""train.compile: torch.compile of each encoder block.

Blocks, not the whole model: the twelve blocks share one compiled graph (compiled once,
reused), the parts that vary by model family (frontend, heads, losses) stay eager, and
a data-dependent branch outside the blocks cannot break the graph. Shapes are dynamic
from the first batch (`dynamic=True`): bucketed batches vary in utterances and frames,
and a static first compile followed by a dynamic recompile would give a resumed run
other kernels, so other rounding, than the uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run here, or None."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python"
    except ImportError as error:
        return f"torch._dynamo cannot be imported ({error})"
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            return f"Inductor's CPU code needs a C++ compiler, and {compiler} is not on PATH"
    return None


def compile_blocks(blocks: Sequence[nn.Module], device: torch.device) -> bool:
    """Compile a model's repeated blocks in place; False (with a one-line warning) where
    torch.compile is unavailable, and the model then trains eager."""
    reason = compile_unavailable(device)
    if reason is not None:
        log.warning("train.compile: %s; training without it", reason)
        return False
    if not blocks:
        log.warning("train.compile: this model has no repeated blocks; training without it")
        return False
    for block in blocks:
        block.compile(dynamic=True)
    log.info("train.compile: %d encoder blocks compiled (dynamic shapes)", len(blocks))
    return True


def compile_counts() -> dict[str, int]:
    """Graphs compiled and recompilations so far in this process (torch._dynamo's
    counters): a bucketed epoch should add none after the first few batches."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "recompiles": sum(counters["recompiles"].values()),
    }
