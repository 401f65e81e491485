"""Checkpoints: one folder each, written atomically, verified before use.

    checkpoints/step-00001000/
        model.safetensors   weights of the unwrapped model (never pickled)
        state.pt            everything else, loaded with torch.load(weights_only=True):
                            optimizer, grad scaler, data position, counters, metric sums
        checksums.json      sha256 of both files, written last

A checkpoint is written into a hidden temporary folder, every file fsynced, then the
folder is renamed into place, so a crash or a full disk mid-write never leaves a
half-written checkpoint under a real name; a checkpoint whose checksums do not match
(a bad disk, a copy cut short) is reported and the previous one is used instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from echoic.errors import EchoicError

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
STATE = "state.pt"
CHECKSUMS = "checksums.json"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(EchoicError):
    """A checkpoint could not be written or read."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: Path) -> int:
    match = _NAME.match(path.name)
    if not match:
        raise CheckpointError(f"{path} is not a checkpoint folder (step-NNNNNNNN)")
    return int(match.group(1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _serialize(path: Path, write: Callable[[Path], None]) -> None:
    """Run a library's writer for `path`, turning its disk errors into an OSError.

    Neither writer raises OSError when the disk fills up (seen on a 64 KiB tmpfs):
    safetensors raises SafetensorError ("... No space left on device (os error 28)"),
    torch.save a RuntimeError that does not say why ("unexpected pos 704 vs 598"), so
    the message gets the free space, which does."""
    try:
        write(path)
    except (SafetensorError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        free = shutil.disk_usage(path.parent).free // 2**20
        raise OSError(f"{path.name}: {message}, {free} MB free on its disk") from error


def save_checkpoint(
    directory: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any]
) -> Path:
    """Write checkpoint `step` atomically; on failure (a full disk, say) raise a one-line
    CheckpointError and leave every earlier checkpoint as it was."""
    directory.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = directory / name
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        _serialize(tmp / WEIGHTS, lambda path: save_file(tensors, path))
        _serialize(tmp / STATE, lambda path: torch.save(state, path))
        checksums = {WEIGHTS: _sha256(tmp / WEIGHTS), STATE: _sha256(tmp / STATE)}
        (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=1) + "\n")
        for file in (WEIGHTS, STATE, CHECKSUMS):
            _fsync(tmp / file)
        _fsync(tmp)
        if final.exists():  # the same step saved again (an epoch end right after a save)
            old = directory / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync(directory)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = error.strerror or str(error)
        raise CheckpointError(
            f"could not save checkpoint {name} in {directory}: {reason}; "
            "earlier checkpoints are intact"
        ) from None
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary and displaced folders excluded)."""
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.iterdir() if p.is_dir() and _NAME.match(p.name)), key=checkpoint_step
    )


def verify(path: Path) -> str | None:
    """Why `path` cannot be used, or None when its files are complete and intact."""
    try:
        expected = json.loads((path / CHECKSUMS).read_text())
    except (OSError, json.JSONDecodeError):
        return "checksums.json is missing or unreadable (an interrupted write?)"
    for file in (WEIGHTS, STATE):
        if not (path / file).is_file():
            return f"{file} is missing"
        if _sha256(path / file) != expected.get(file):
            return f"{file} does not match its checksum"
    return None


def newest_valid(directory: Path) -> Path | None:
    """The newest checkpoint that verifies; each corrupt one on the way is reported."""
    for path in reversed(list_checkpoints(directory)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is unusable (%s); trying the one before it", path, problem)
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, state). The state is loaded with weights_only=True: no code is unpickled."""
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is unusable: {problem}")
    weights = load_file(path / WEIGHTS)
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    return weights, state


def prune(directory: Path, keep_last: int, keep: set[int]) -> None:
    """Delete checkpoints except the newest `keep_last` and the steps in `keep`."""
    paths = list_checkpoints(directory)
    newest = {checkpoint_step(p) for p in paths[-keep_last:]}
    for path in paths:
        step = checkpoint_step(path)
        if step not in newest and step not in keep:
            shutil.rmtree(path, ignore_errors=True)


def average_weights(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the checkpoints' weights (integer buffers, such as
    BatchNorm's counter, are taken from the newest)."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    resolved = [p.resolve() for p in paths]
    twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if twice:  # it would weigh those double, silently
        raise CheckpointError(f"checkpoints given more than once: {', '.join(twice)}")
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is unusable: {problem}")
        weights = load_file(path / WEIGHTS)
        for key, value in weights.items():
            if value.is_floating_point():
                total[key] = total[key] + value.double() if key in total else value.double()
            else:
                total[key] = value
    dtypes = load_file(paths[-1] / WEIGHTS)
    return {
        k: (v / len(paths)).to(dtypes[k].dtype) if v.is_floating_point() else v
        for k, v in total.items()
    }
