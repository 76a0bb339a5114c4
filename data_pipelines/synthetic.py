"""``source: synthetic``: random tensors made on the device, for throughput profiling."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import DataConfig
from .loader import Loader


class SyntheticLoader(Loader):
    """Random images made once on the device, fresh random labels per step: profiles the model
    and head with no data cost, with the same step count and state as a real epoch."""

    def __init__(self, cfg: DataConfig, **kw: Any) -> None:
        assert cfg.num_classes is not None and cfg.num_images is not None
        super().__init__(cfg, num_classes=cfg.num_classes, num_images=cfg.num_images, **kw)
        self.plan = self._shard_plan()
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1009 + self.rank)
        self._images = (
            torch.rand(
                (self.batch_size, 3, cfg.image_size, cfg.image_size),
                generator=gen,
                device=self.device,
            )
            * 2
            - 1
        ).to(dtype)

    def _steps_from(self, start: int) -> int:
        return self.plan.steps(start)

    def _open_epoch(self) -> None:
        _, self._valid = self.plan.rank_batches(self.epoch, self._start)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        key = [self.seed, self.epoch, self.plan.first_position(self._start, self._step)]
        labels = np.random.default_rng(key).integers(0, self.num_classes, self.batch_size)
        return self._images, torch.from_numpy(labels).to(self.device), int(self._valid[self._step])
