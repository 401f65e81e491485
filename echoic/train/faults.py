"""What can go wrong in a long run, and how the trainer notices it."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError)."""
    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in message or "can't allocate memory" in message
    )


class StopRequest:
    """SIGTERM or SIGINT (Ctrl-C) asks for a checkpoint and a clean exit; a second
    SIGINT while that is under way stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name
        log.warning(
            "%s received: saving a checkpoint, then stopping (Ctrl-C again to stop at once)", name
        )


class PausePoint:
    """Test hook: ECHOIC_PAUSE_AT="STEP:MICRO" (after MICRO micro-batches of the window
    that follows optimizer step STEP; MICRO 0 is right after step STEP) or "epoch-end:E"
    makes the trainer write `<exp>/paused` and wait there, so a test can kill it from
    outside at an exact point. A stop request ends the wait."""

    def __init__(self, exp_dir: Path) -> None:
        self.exp_dir = exp_dir
        self.where = os.environ.get("ECHOIC_PAUSE_AT")

    def check(self, key: str, stop: StopRequest) -> None:
        if self.where is None or key != self.where:
            return
        (self.exp_dir / "paused").write_text(key)
        while stop.requested is None:
            time.sleep(0.05)
