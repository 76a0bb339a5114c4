"""``reader: external``: our sampler picks each rank's samples, DALI decodes and augments.

The default, because it is the only way to shuffle an identity-sorted shipped ``.rec`` globally
(DALI 2.4's readers shuffle through a buffer) and to resume in O(1) at any world size.

The JPEG bytes are read ahead on a background thread (``Feeder``), not in DALI's callback on the
training thread, and one pipeline serves every epoch: the feeder's stream runs on into the next
epoch, so only a jump (a resume, a reset mid-epoch, a DALI error) rebuilds it.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import DataConfig
from .dali import start_pipeline, to_torch
from .jpeg import decode_error, image_size
from .sources import (
    DataError,
    FolderDataset,
    RecDataset,
    mismatch_message,
    undecodable_message,
)
from .stream_loader import StreamLoader


class ExternalLoader(StreamLoader):
    """``external`` reader: our ``ShardPlan`` picks the samples, DALI decodes and augments."""

    def __init__(self, cfg: DataConfig, dataset: RecDataset | FolderDataset, **kw: Any) -> None:
        super().__init__(cfg, dataset, **kw)
        self._pipe = None

    def _open_epoch(self) -> None:
        if self._pipe is not None and self._stream_is_here():
            return
        feeder = self._start_stream(self.cfg.prefetch + 2)
        self._pipe = start_pipeline(self, feed=feeder.take, reader=None)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        try:
            images, labels = self._pipe.run()
        except DataError:  # a bad record the feeder reached, already named
            self._shutdown()
            raise
        except RuntimeError as exc:
            message = self._diagnose(self._step)
            self._shutdown()  # the pipeline is dead after a DALI error; rebuilt on the next call
            raise DataError(message) from exc
        self.skipped = len(self.dataset.skipped)  # grows when a bad record is first read
        return (*to_torch(images, labels, self.device), self._advance_stream())

    def _diagnose(self, step: int) -> str:
        """Name the undecodable or mismatched samples near ``step`` (DALI's error does not)."""
        bad, odd = [], []
        side = self.cfg.image_size
        indices, _ = self.plan.rank_batches(self.epoch, self._start)
        for k in range(step, min(step + self.cfg.prefetch + 1, len(indices))):
            for i in indices[k]:
                try:
                    data = self.dataset.read(i)
                except DataError as exc:  # a record whose framing is bad, named by the source
                    bad.append(f"  {exc}")
                    continue
                why = decode_error(data)
                if why:
                    bad.append(f"  {self.dataset.describe(i)}: {why}")
                elif not self.cfg.resizes:
                    width, height = image_size(data)
                    if (width, height) != (side, side):
                        odd.append(f"{self.dataset.describe(i)} is {width}x{height}")
        where = f"epoch {self.epoch} step {step}"
        if bad:
            return undecodable_message(self.dataset.path, where, bad)
        if odd:
            return mismatch_message(self.dataset.path, where, odd[0], side)
        return f"{self.dataset.path}: DALI failed on {where}; see the chained error"

    def _shutdown(self) -> None:
        """Stop the stream: the feeder's thread and the pipeline."""
        super()._shutdown()
        self._pipe = None
