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
from .jpeg import decode_error
from .loader import Loader, start_pipeline, to_torch
from .sources import DataError, FolderDataset, RecDataset


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
        """Name the undecodable samples near ``step`` (DALI's error does not say which)."""
        bad = []
        for k in range(step, min(step + self.cfg.prefetch + 1, len(self._indices))):
            for i in self._indices[k]:
                why = decode_error(self.dataset.read(i))
                if why:
                    bad.append(f"  {self.dataset.describe(i)}: {why}")
        where = f"epoch {self.epoch} step {step}"
        if not bad:
            return f"DALI failed on {where}; see the chained error"
        return (
            f"undecodable image(s) at {where}:\n"
            + "\n".join(sorted(set(bad)))
            + "\nFind all with `python -m data_pipelines.check PATH --full`."
        )

    def _close(self) -> None:
        self._pipe = None
        super()._close()
