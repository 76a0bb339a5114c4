"""``Loader``: the contract every data source meets, and the epoch/position bookkeeping.

Labels leave as ``int64`` of shape (B,) -- float labels gave insightface users a constant loss of
69.08 (#1437). Every rank runs ``len(loader)`` steps per epoch so the Partial FC all-gather never
waits on a rank that ran out (#2015). State is (epoch, global sample position), identical on all
ranks, so a checkpoint from rank 0 resumes every rank.

Free of DALI: the ``nvimgcodec`` decoder's loader runs where DALI is not installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import DataConfig
from .sampler import ShardPlan


class Loader:
    """Iterate one epoch of ``(images, labels)``; ``reset()`` starts the next epoch.

    ``images``: (B, 3, S, S) with S = ``image_size`` (112), in [-1, 1], fp16 on a GPU, fp32 on
    the CPU. ``labels``: int64 (B,). Iterating an exhausted loader starts the next epoch, so
    ``for batch in loader`` works per epoch with or without an explicit ``reset()``.

    Last batch ``pad``: the final global batch is filled with real samples repeated from the
    start of the epoch's order, with their true labels, so all ranks' batches are full. ``valid``
    is how many samples of the batch just yielded are new this epoch; with the external reader
    they are ``images[:valid]`` (the native reader may shuffle the repeats in). The head needs no
    mask: repeats are correctly labelled samples, slightly re-weighted.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        num_classes: int,
        num_images: int,
        batch_size: int,
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int,
    ) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_images = num_images
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.seed = seed
        self.epoch = 0
        self.valid = 0
        self.skipped = 0  # corrupt records left out (data.skip_corrupt)
        self._start = 0  # global samples consumed before this epoch segment began
        self._step = 0  # batches yielded in this segment
        self._open = False

    def _shard_plan(self) -> ShardPlan:
        """This rank's cut of the seeded global order (readers that choose samples themselves)."""
        return ShardPlan(
            self.num_images,
            self.batch_size,
            self.rank,
            self.world_size,
            self.cfg.last_batch,
            self.cfg.shuffle,
            self.seed,
        )

    # -- subclasses ---------------------------------------------------------------------------
    def _steps_from(self, start: int) -> int:
        raise NotImplementedError

    def _open_epoch(self) -> None:
        raise NotImplementedError

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        raise NotImplementedError

    def _close(self) -> None:
        self._open = False

    # -- public -------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def position(self) -> int:
        """Global samples consumed in this epoch (a multiple of the global batch)."""
        return self._start + self._step * self.global_batch

    def __len__(self) -> int:
        return self._steps_from(0)

    def __iter__(self) -> Loader:
        if self._steps_from(self._start) - self._step <= 0:
            self.reset()
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._steps_from(self._start) - self._step <= 0:
            self._close()
            raise StopIteration
        if not self._open:
            self._open_epoch()
            self._open = True
        images, labels, self.valid = self._next_batch()
        self._step += 1
        return images, labels

    def reset(self) -> None:
        """Start the next epoch (also mid-epoch: the rest of this epoch is dropped)."""
        self._close()
        self.epoch += 1
        self._start = 0
        self._step = 0

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch yielded; the same on every rank."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_images": self.num_images,
            "seed": self.seed,
            "shuffle": self.cfg.shuffle,
            "reader": self.cfg.reader,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``; the next batch is the one after the last batch saved."""
        mine = self.state_dict()
        for key in ("num_images", "seed", "shuffle", "reader"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has {mine[key]!r}; "
                    "resuming would not continue the same sample order"
                )
        self._check_resume(state)
        self._close()
        self.epoch = int(state["epoch"])
        self._start = int(state["position"])
        self._step = 0

    def _check_resume(self, state: dict[str, Any]) -> None:
        """Positions are global sample counts, valid for any world size by default."""


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def mix_seed(*parts: int) -> int:
    """A DALI seed (31 bits) mixed from several integers."""
    return int(np.random.default_rng(list(parts)).integers(0, 2**31 - 1))
