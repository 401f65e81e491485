"""Duration-bucketed batching whose order is a pure function of (seed, epoch).

An epoch's global batch order is computed in one O(N) pass from the utterance
durations: utterances are sorted by duration into equal-count buckets, shuffled
within each bucket, packed greedily into batches of at most `max_frames` padded
frames (or `batch_size` utterances), and the batches of all buckets are shuffled
together. Nothing depends on what happened before, so resuming at batch k is an
index into that list: it costs the same for every k.

The position is (epoch, batch_index): batch_index counts global batches already
consumed. With `world_size` ranks, rank r takes global batches k+r, k+r+W, ... from
the resume point k, so the sequence of global batches (and therefore what the model
sees per optimizer step) does not depend on the number of ranks; the epoch's last
incomplete group of W batches is dropped so every rank takes the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from echoic.seeding import make_rng

TOO_SHORT = "too_short"
TOO_LONG = "too_long"


@dataclass(frozen=True)
class BatchPlan:
    """One batch to load: its place in the epoch and the manifest indices it holds."""

    epoch: int
    index: int  # position in the epoch's global batch order
    utterances: tuple[int, ...]


class BucketBatchSampler:
    def __init__(
        self,
        durations: Sequence[float],
        *,
        frames_per_second: float = 100.0,
        max_frames: int | None = None,
        batch_size: int | None = None,
        max_batch_size: int | None = None,
        num_buckets: int = 20,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        min_duration: float = 0.0,
        max_duration: float = float("inf"),
        length_factor: float = 1.0,
        drop_last: bool = True,
    ) -> None:
        """`length_factor` scales frame estimates (e.g. 1/0.9 when speed perturbation
        may slow audio down), so batches stay within `max_frames` after augmentation.
        `drop_last=False` (evaluation) keeps the last incomplete group of world_size
        batches, so ranks may then take different numbers of batches."""
        if (max_frames is None) == (batch_size is None):
            raise ValueError("set exactly one of max_frames and batch_size")
        if (max_frames is not None and max_frames < 1) or (
            batch_size is not None and batch_size < 1
        ):
            raise ValueError("max_frames and batch_size must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_buckets < 1:
            raise ValueError("num_buckets must be at least 1")
        self.max_frames = max_frames
        self.batch_size = batch_size
        self.max_batch_size = max_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        durations_array = np.asarray(durations, dtype=np.float64)
        self._frames = np.ceil(durations_array * frames_per_second * length_factor).astype(np.int64)
        self.excluded: dict[str, list[int]] = {
            TOO_SHORT: np.flatnonzero(durations_array < min_duration).tolist(),
            TOO_LONG: np.flatnonzero(durations_array > max_duration).tolist(),
        }
        keep = (durations_array >= min_duration) & (durations_array <= max_duration)
        kept = np.flatnonzero(keep)
        # Stable sort: ties keep manifest order, so the plan never depends on sort internals.
        by_length = kept[np.argsort(durations_array[kept], kind="stable")]
        self._buckets = [b for b in np.array_split(by_length, min(num_buckets, max(1, len(kept))))]
        self._cache: tuple[int, list[tuple[int, ...]]] | None = None
        self.epoch = 0
        self.batch_index = 0

    # -- the plan --------------------------------------------------------------------------

    def epoch_batches(self, epoch: int) -> list[tuple[int, ...]]:
        """The global batch order of `epoch` (cached for the most recent epoch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = make_rng(self.seed, epoch, "batch-order")
        batches: list[tuple[int, ...]] = []
        for bucket in self._buckets:
            order = rng.permutation(bucket) if self.shuffle else bucket
            batches.extend(self._pack(order))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def _pack(self, order: np.ndarray) -> list[tuple[int, ...]]:
        batches: list[tuple[int, ...]] = []
        current: list[int] = []
        longest = 0
        caps = [c for c in (self.max_batch_size, self.batch_size) if c]
        cap = min(caps) if caps else max(1, len(order))
        for index in order.tolist():
            frames = int(self._frames[index])
            grown = max(longest, frames)
            full = len(current) >= cap or (
                self.max_frames is not None and (len(current) + 1) * grown > self.max_frames
            )
            if current and full:
                batches.append(tuple(current))
                current, grown = [], frames
            current.append(index)
            longest = grown
        if current:
            batches.append(tuple(current))
        return batches

    def set_max_frames(self, max_frames: int | None) -> None:
        """Change the batch budget (after an out-of-memory batch, say); epochs planned
        from now on use it."""
        if max_frames != self.max_frames:
            self.max_frames = max_frames
            self._cache = None

    def padding_efficiency(self, epoch: int) -> float:
        """Estimated real frames / padded frames over the epoch's batches (from durations)."""
        real = padded = 0
        for batch in self.epoch_batches(epoch):
            frames = self._frames[list(batch)]
            real += int(frames.sum())
            padded += int(frames.max()) * len(batch)
        return real / padded if padded else 1.0

    # -- position --------------------------------------------------------------------------

    def set_position(self, epoch: int, batch_index: int = 0) -> None:
        total = len(self.epoch_batches(epoch))
        if epoch < 0 or not 0 <= batch_index <= total:
            raise ValueError(
                f"position ({epoch}, {batch_index}) is outside the epoch's {total} batches"
            )
        self.epoch = epoch
        self.batch_index = batch_index

    def position_after(self, plan: BatchPlan) -> tuple[int, int]:
        """(epoch, batch_index) to resume from once every rank has consumed its batch of the
        group that `plan` belongs to."""
        return plan.epoch, plan.index - self.rank + self.world_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if set(state) != {"epoch", "batch_index"}:
            raise ValueError(
                f"sampler state must have keys epoch and batch_index, got {sorted(state)}"
            )
        self.set_position(int(state["epoch"]), int(state["batch_index"]))

    # -- iteration -------------------------------------------------------------------------

    def _end(self, total: int) -> int:
        """Global index where this pass stops: with drop_last, only complete groups of
        world_size batches."""
        if not self.drop_last:
            return total
        return self.batch_index + (total - self.batch_index) // self.world_size * self.world_size

    def __len__(self) -> int:
        """Batches this rank yields from the current position to the end of the epoch."""
        first = self.batch_index + self.rank
        end = self._end(len(self.epoch_batches(self.epoch)))
        return max(0, -(-(end - first) // self.world_size))

    def __iter__(self) -> Iterator[BatchPlan]:
        epoch, start = self.epoch, self.batch_index
        batches = self.epoch_batches(epoch)
        for index in range(start + self.rank, self._end(len(batches)), self.world_size):
            yield BatchPlan(epoch=epoch, index=index, utterances=batches[index])
