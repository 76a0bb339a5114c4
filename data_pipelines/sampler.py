"""Which samples each rank reads, per epoch: one global order, cut into global batches.

Every rank derives the same permutation from ``(seed, epoch)`` -- no communication -- and global
batch ``k`` holds order positions ``[k*W*B, (k+1)*W*B)``; rank ``r`` takes the ``r``-th block of
``B``. Ranks are therefore disjoint, cover the epoch, and all run the same number of steps, which
the Partial FC all-gather needs (insightface #2015). A position is a count of samples, so resume
needs no per-rank state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardPlan:
    """The global order cut for ``rank`` of ``world_size``; positions are global sample counts."""

    num_images: int
    batch_size: int
    rank: int
    world_size: int
    last_batch: str = "drop"  # drop: lose the tail < W*B; pad: wrap to the order's start
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.steps(0) == 0:
            raise ValueError(
                f"{self.num_images} images make no full global batch of "
                f"{self.world_size} ranks x {self.batch_size}; use last_batch 'pad' or fewer ranks"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def steps(self, start: int) -> int:
        """Steps left in an epoch after ``start`` samples were consumed (same on every rank)."""
        left = max(self.num_images - start, 0)
        if self.last_batch == "drop":
            return left // self.global_batch
        return -(-left // self.global_batch)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's global order: ``default_rng([seed, epoch]).permutation(n)``'s values.

        int32 below 2^31 samples (168 MB at 42M instead of 336): ``shuffle`` of an int32
        ``arange`` draws the same swaps as ``permutation``, so the values are the same.
        """
        dtype = np.int32 if self.num_images < 2**31 else np.int64
        order = np.arange(self.num_images, dtype=dtype)
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        return order

    def rank_batches(self, epoch: int, start: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices (steps, B), valid (steps,)) for this rank from global position ``start``.

        ``valid[k]`` counts the batch's samples that are new this epoch; the rest are padding
        (real samples repeated from the order's start) and always sit at the batch's end.
        Global batch ``k`` is order positions ``start + k*W*B ...``; this rank's block is cut from
        a (steps, W, B) view of the order, so only its own ``steps x B`` indices are copied.
        """
        steps = self.steps(start)
        n, w, b = self.num_images, self.world_size, self.batch_size
        order = self.order(epoch)
        inside = min(steps, max(n - start, 0) // self.global_batch)  # steps that do not wrap
        body = order[start : start + inside * self.global_batch].reshape(inside, w, b)
        parts = [body[:, self.rank, :]]
        if steps > inside:  # the padded tail wraps to the order's start (pad only)
            pos = (
                start
                + np.arange(inside, steps, dtype=np.int64)[:, None] * self.global_batch
                + self.rank * b
                + np.arange(b, dtype=np.int64)[None, :]
            )
            parts.append(order[pos % n])
        indices = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        first = start + np.arange(steps, dtype=np.int64) * self.global_batch + self.rank * b
        valid = np.clip(n - first, 0, b)
        return indices, valid

    def valid(self, start: int, step: int) -> int:
        """How many of ``step``'s samples (from ``start``) are new this epoch (``rank_batches``'
        ``valid`` for one step, without the epoch's order)."""
        first = start + step * self.global_batch + self.rank * self.batch_size
        return int(np.clip(self.num_images - first, 0, self.batch_size))

    def first_position(self, start: int, step: int) -> int:
        """Global order position of this rank's first sample in ``step`` (keys augment RNG)."""
        return start + step * self.global_batch + self.rank * self.batch_size
