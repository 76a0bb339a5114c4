"""``StreamLoader``: what the loaders fed in the ``external`` order share (DALI's external
source and nvImageCodec): the data set, the shard plan, and the ``Feeder`` stream.

The stream runs on from epoch to epoch, so a loader keeps it while the next epoch it is asked
for is where the stream already is, and rebuilds it only after a jump (a resume, a reset
mid-epoch, an error). ``_stream`` is the ``(epoch, start, step)`` the stream yields next.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import DataConfig
from .feeder import Batch, Feeder
from .loader import Loader
from .sources import FolderDataset, RecDataset


class StreamLoader(Loader):
    def __init__(self, cfg: DataConfig, dataset: RecDataset | FolderDataset, **kw: Any) -> None:
        super().__init__(cfg, num_classes=dataset.num_classes, num_images=dataset.num_images, **kw)
        self.dataset = dataset
        self.skipped = len(dataset.skipped)
        self.label_map_path = dataset.label_map_path
        self.plan = self._shard_plan()
        self._feeder: Feeder | None = None
        self._stream: tuple[int, int, int] | None = None

    def _steps_from(self, start: int) -> int:
        return self.plan.steps(start)

    def _stream_is_here(self) -> bool:
        """The running stream yields the epoch asked for next (the last one ran to its end)."""
        return self._feeder is not None and self._stream == (self.epoch, self._start, self._step)

    def _start_stream(self, depth: int, prepare: Callable[[Batch], Any] | None = None) -> Feeder:
        """A fresh feeder from the loader's position (any running one stopped first)."""
        self._shutdown()
        extra = {} if prepare is None else {"prepare": prepare}
        self._feeder = Feeder(
            self.plan, self.dataset.read_batch, epoch=self.epoch, start=self._start,
            seed=self.seed, aug=self.cfg.dali_aug, mirror=self.cfg.mirror, depth=depth, **extra,
        )  # fmt: skip
        self._stream = (self.epoch, self._start, self._step)
        return self._feeder

    def _advance_stream(self) -> int:
        """One batch taken: move ``_stream`` on (into the next epoch after the last step);
        returns the real samples in the batch taken (``Loader.valid``)."""
        epoch, start, step = self._stream
        valid = self.plan.valid(start, step)
        step += 1
        self._stream = (epoch, start, step) if step < self.plan.steps(start) else (epoch + 1, 0, 0)
        return valid

    def _shutdown(self) -> None:
        """Stop the stream (the feeder's thread)."""
        if self._feeder is not None:
            self._feeder.close()
        self._feeder = self._stream = None
