"""``StepLog``: what the trainer remembers of each optimizer step, and when it says so.

A step's loss stays a device tensor until the logging interval reads all of them in one host
sync (``read``); the phase split of each step is summed for the progress line and handed to
``on_split`` (the profiler) as it is. ``entries`` is the run's history: ``step``, ``loss``,
``lr``, ``loss_scale`` and ``applied`` per optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pfc_ds.train.engine import StepResult
from pfc_ds.train.metrics import MetricsLogger, coarse_phases


class StepLog:
    def __init__(
        self,
        entries: list[dict[str, Any]],
        *,
        log_every: int,
        global_batch: int,
        on_split: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self.entries = entries
        self.log_every, self.global_batch, self.on_split = log_every, global_batch, on_split
        self._unread: list[int] = []  # entries whose loss is still a device tensor
        self._split: dict[str, float] = {}
        self._since = 0  # steps since the last line

    def restart(self) -> None:
        """A new ``fit``: the first line covers the steps from here."""
        self._split, self._since = {}, 0

    def record(self, step: int, res: StepResult, split: dict[str, float]) -> None:
        self._unread.append(len(self.entries))
        self.entries.append({"step": step, "loss": res.loss, "lr": res.lr,
                             "loss_scale": res.loss_scale, "applied": res.applied})  # fmt: skip
        for name, ms in split.items():
            self._split[name] = self._split.get(name, 0.0) + ms
        if self.on_split is not None:
            self.on_split(step, split)
        self._since += 1

    def due(self, step: int, end: int) -> bool:
        return step % self.log_every == 0 or step == end

    def read(self) -> None:
        """Every unread loss in one host sync."""
        if self._unread:
            losses = torch.stack([self.entries[i]["loss"] for i in self._unread]).tolist()
            for i, value in zip(self._unread, losses, strict=True):
                self.entries[i]["loss"] = value
            self._unread.clear()

    def write(
        self, logger: MetricsLogger, step: int, loss_scale: float | None, extra: dict[str, Any]
    ) -> None:
        """The progress line and ``metrics.jsonl`` row for the steps since the last one (after
        ``read``)."""
        last = self.entries[-1]
        logger.log(
            step,
            loss=last["loss"],
            lr=last["lr"],
            images=self._since * self.global_batch,
            steps=self._since,
            loss_scale=loss_scale,
            phases=coarse_phases(self._split),
            extra={**extra, "skipped": not last["applied"]},
        )
        self._split, self._since = {}, 0

    def truncate(self, step: int) -> None:
        """Forget the steps after ``step`` (a rollback to it)."""
        self.entries[:] = [e for e in self.entries if e["step"] <= step]
        self._unread = [i for i in self._unread if i < len(self.entries)]
