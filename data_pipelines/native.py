"""``reader: native``: DALI's own C++ readers, ``fn.readers.mxnet`` and ``fn.readers.file``.

``fn.readers.mxnet`` reads shipped insightface files through a filtered index of image records
(header and identity records make DALI's decoder fail, insightface #2235).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from .config import DataConfig
from .dali import start_pipeline, to_torch
from .loader import Loader, ceil_div, mix_seed
from .params import draw_params
from .sources import DataError, FolderDataset, RecDataset, mismatch_message

_DEFAULT_SHUFFLE_BUFFER = 16384
# DALI's crop of an image smaller than the output: "... out of bounds ... input_shape={80 x 64 x 3}"
_OUT_OF_BOUNDS = re.compile(r"out of bounds.*?input_shape=\{(\d+) x (\d+)", re.DOTALL)


class NativeLoader(Loader):
    """``native`` reader: ``fn.readers.mxnet`` (filtered index) or ``fn.readers.file``.

    DALI cuts the sorted records into ``world_size`` contiguous shards; by default the shard a
    rank reads rotates each epoch (``(rank + epoch) % W``) and samples are shuffled through a
    ``shuffle_buffer``. Resume replays the epoch's batches up to the saved position (O(position)
    decode), so it needs the same world size and batch size.
    """

    def __init__(self, cfg: DataConfig, dataset: RecDataset | FolderDataset, **kw: Any) -> None:
        super().__init__(cfg, num_classes=dataset.num_classes, num_images=dataset.num_images, **kw)
        self.dataset = dataset
        self.skipped = len(dataset.skipped)
        self.label_map_path = dataset.label_map_path
        n, w, b = self.num_images, self.world_size, self.batch_size
        self._full_steps = (
            (n // w) // b if cfg.last_batch == "drop" else ceil_div(ceil_div(n, w), b)
        )
        if self._full_steps == 0:
            raise ValueError(f"{n} images make no full batch of {b} on each of {w} ranks")
        if isinstance(dataset, RecDataset):
            self._reader = {
                "op": "mxnet",
                "path": [dataset.scan.rec_path],
                "index_path": [dataset.image_index()],
            }
        else:
            files = [dataset.scan.path(i) for i in range(n)]
            self._reader = {
                "op": "file",
                "files": files,
                "labels": dataset.labels.astype(np.int32).tolist(),
            }
        self._pipe = None

    def _steps_from(self, start: int) -> int:
        return max(self._full_steps - start // self.global_batch, 0)

    def _check_resume(self, state: dict[str, Any]) -> None:
        for key in ("world_size", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"native reader resume needs the same {key}: saved {state[key]}, now {getattr(self, key)}"
                )

    def shard(self) -> int:
        stick = bool(self.cfg.stick_to_shard)
        return self.rank if stick else (self.rank + self.epoch) % self.world_size

    def _open_epoch(self) -> None:
        shard = self.shard()
        n, w = self.num_images, self.world_size
        self._shard_size = n * (shard + 1) // w - n * shard // w
        reader = {
            **self._reader,
            "shard_id": shard,
            "num_shards": w,
            "stick_to_shard": True,  # we rotate shards per epoch ourselves
            "pad_last_batch": True,
            "random_shuffle": self.cfg.shuffle,
            "initial_fill": self.cfg.shuffle_buffer or _DEFAULT_SHUFFLE_BUFFER,
            "seed": mix_seed(self.seed, self.epoch, shard),
        }
        self._fed = 0
        self._pipe = start_pipeline(self, feed=self._feed, reader=reader)
        for _ in range(self._start // self.global_batch):  # replay to the saved position
            self._run()

    def _feed(self) -> list[np.ndarray]:
        key = [self.seed, self.epoch, self.rank, self._fed]
        self._fed += 1
        return draw_params(key, self.batch_size, self.cfg.dali_aug, self.cfg.mirror)

    def _run(self) -> tuple[Any, Any]:
        try:
            return self._pipe.run()
        except RuntimeError as exc:
            message = self._diagnose(str(exc))
            self._close()  # the pipeline is dead after a DALI error; reopen on the next call
            raise DataError(message) from exc

    def _diagnose(self, error: str) -> str:
        """DALI's reader picked the samples, so only its message can say which size failed."""
        path = self.dataset.path
        where = f"epoch {self.epoch} step {self._step}"
        found = _OUT_OF_BOUNDS.search(error)
        if found and not self.cfg.resizes:
            example = f"an image is {found[2]}x{found[1]}"
            return mismatch_message(path, where, example, self.cfg.image_size)
        return (
            f"{path}: DALI failed on {where}; see the chained error "
            f"(`python -m data_pipelines.check {path} --full` names undecodable images)"
        )

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        images, labels = self._run()
        done = self._start // self.global_batch + self._step
        valid = int(np.clip(self._shard_size - done * self.batch_size, 0, self.batch_size))
        return (*to_torch(images, labels, self.device), valid)

    def _close(self) -> None:
        self._pipe = None
        super()._close()
