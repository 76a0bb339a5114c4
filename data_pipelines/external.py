"""``reader: external``: our sampler picks each rank's samples, DALI decodes and augments.

The default, because it is the only way to shuffle an identity-sorted shipped ``.rec`` globally
(DALI 2.4's readers shuffle through a buffer) and to resume in O(1) at any world size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .augment import draw_params
from .config import DataConfig
from .jpeg import decode_error, image_size
from .loader import Loader, start_pipeline, to_torch
from .sources import DataError, FolderDataset, RecDataset, mismatch_message


class ExternalLoader(Loader):
    """``external`` reader: our ``ShardPlan`` picks the samples, DALI decodes and augments."""

    def __init__(self, cfg: DataConfig, dataset: RecDataset | FolderDataset, **kw: Any) -> None:
        super().__init__(cfg, num_classes=dataset.num_classes, num_images=dataset.num_images, **kw)
        self.dataset = dataset
        self.skipped = len(dataset.skipped)
        self.label_map_path = dataset.label_map_path
        self.plan = self._shard_plan()
        self._pipe = None

    def _steps_from(self, start: int) -> int:
        return self.plan.steps(start)

    def _open_epoch(self) -> None:
        self._indices, self._valid = self.plan.rank_batches(self.epoch, self._start)
        self._fed = 0
        self._pipe = start_pipeline(self, feed=self._feed, reader=None)

    def _feed(self) -> list[np.ndarray]:
        k = self._fed
        if k >= len(self._indices):
            raise StopIteration
        self._fed += 1
        idx = self._indices[k]
        key = [self.seed, self.epoch, self.plan.first_position(self._start, k)]
        params = draw_params(key, self.batch_size, self.cfg.dali_aug, self.cfg.mirror)
        jpegs = [self.dataset.read(i) for i in idx]
        return [jpegs, self.dataset.labels[idx], *params]

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        try:
            images, labels = self._pipe.run()
        except RuntimeError as exc:
            message = self._diagnose(self._step)
            self._close()  # the pipeline is dead after a DALI error; reopen on the next call
            raise DataError(message) from exc
        return (*to_torch(images, labels, self.device), int(self._valid[self._step]))

    def _diagnose(self, step: int) -> str:
        """Name the undecodable or mismatched samples near ``step`` (DALI's error does not)."""
        bad, odd = [], []
        side = self.cfg.image_size
        for k in range(step, min(step + self.cfg.prefetch + 1, len(self._indices))):
            for i in self._indices[k]:
                data = self.dataset.read(i)
                why = decode_error(data)
                if why:
                    bad.append(f"  {self.dataset.describe(i)}: {why}")
                elif not self.cfg.resizes:
                    width, height = image_size(data)
                    if (width, height) != (side, side):
                        odd.append(f"{self.dataset.describe(i)} is {width}x{height}")
        where = f"epoch {self.epoch} step {step}"
        if bad:
            return (
                f"{self.dataset.path}: undecodable image(s) at {where}:\n"
                + "\n".join(sorted(set(bad)))
                + f"\nFind all with `python -m data_pipelines.check {self.dataset.path} --full`."
            )
        if odd:
            return mismatch_message(self.dataset.path, where, odd[0], side)
        return f"{self.dataset.path}: DALI failed on {where}; see the chained error"

    def _close(self) -> None:
        self._pipe = None
        super()._close()
