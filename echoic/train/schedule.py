"""Learning-rate schedules as pure functions of the optimizer step.

A pure function means nothing to save or restore: resuming at step k gives lr(k).
"""

from __future__ import annotations

import math

from echoic.train.config import OptimConfig


def learning_rate(config: OptimConfig, step: int, max_steps: int | None) -> float:
    """The rate for optimizer step `step` (counting from 1)."""
    step = max(step, 1)
    warmup = config.warmup_steps
    if config.scheduler == "noam":
        # Linear warmup to `lr` at `warmup`, then decay with 1/sqrt(step) (WeNet's
        # "warmuplr"): the same curve as the Transformer paper, scaled to peak at lr.
        if warmup == 0:
            return config.lr
        return config.lr * warmup**0.5 * min(step**-0.5, step * warmup**-1.5)
    if warmup and step < warmup:
        return config.lr * step / warmup
    if config.scheduler == "constant":
        return config.lr
    # cosine from lr at the end of warmup down to min_lr at max_steps
    span = max(1, (max_steps or step) - warmup)
    progress = min(1.0, (step - warmup) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))
