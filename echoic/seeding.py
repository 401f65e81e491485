"""Randomness as a pure function of named inputs.

Every random choice in the data path draws from a generator seeded by
(seed, epoch, utterance id, purpose), so results never depend on worker count,
rank, process start order or where a run was resumed.
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(*parts: int | str) -> int:
    """A 64-bit seed from any mix of ints and strings; stable across processes and runs.

    Python's `hash()` is salted per process, so we hash an explicit encoding instead.
    """
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        tag = b"i" if isinstance(part, int) else b"s"
        digest.update(tag + str(part).encode() + b"\x00")
    return int.from_bytes(digest.digest(), "little")


def make_rng(*parts: int | str) -> np.random.Generator:
    """A numpy generator seeded by `derive_seed(*parts)`."""
    return np.random.Generator(np.random.PCG64(derive_seed(*parts)))
