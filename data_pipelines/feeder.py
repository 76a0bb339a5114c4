"""``Feeder``: reads the encoded batches of a loader's sample stream on a background thread.

A decoder pulls batches when it needs them (DALI's external source calls its ``feed`` from
``pipe.run()`` on the training thread). Reading the JPEG bytes there would put file I/O and
Python work on the training thread, between GPU steps; the feeder reads ahead instead, into a
bounded queue, and ``take()`` only hands over a batch that is ready.

The stream does not stop at an epoch's end: after the last step of epoch ``e`` come the steps of
epoch ``e + 1`` from its start, so one decoder pipeline serves every epoch (building a DALI
pipeline per epoch cost a rebuild and a cold nvJPEG each time). Each item is one batch:
``(jpegs, labels, *augmentation params)``, the params drawn from the batch's key exactly as
before, so the stream is the same whoever reads it and whenever.

DALI takes that item as its external-source outputs. A decoder that is not DALI passes
``prepare``, which turns each ``Batch`` into what the consumer wants on the same thread (the
``nvimgcodec`` loader decodes and augments there), so the training thread only takes results.
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .params import draw_params
from .sampler import ShardPlan

_LIVE: weakref.WeakSet[Feeder] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stop running feeders before the interpreter tears down: a daemon thread still inside a
    C++ decoder at exit aborts the process ("terminate called without an active exception")."""
    for feeder in list(_LIVE):
        feeder.close()


@dataclass(frozen=True)
class Batch:
    """One step of the stream: where it is, which samples, their bytes, labels and params."""

    epoch: int
    start: int  # the epoch segment's first global position (a resume point, or 0)
    step: int  # steps after ``start``
    indices: np.ndarray  # (B,) sample ids
    jpegs: list[Any]
    labels: np.ndarray
    params: list[np.ndarray]  # one (B,) array per ``active_params`` name

    def dali_inputs(self) -> list[Any]:
        """What DALI's external source takes: ``(jpegs, labels, *params)``."""
        return [self.jpegs, self.labels, *self.params]


class Feeder:
    """Batches of ``plan``'s sample stream from ``(epoch, start)`` on, read ``depth`` ahead.

    ``read_batch(indices)`` returns the samples' encoded bytes and their labels (a source may
    put another sample in a bad one's place, with that sample's label). Each queued item is
    ``prepare(batch)`` (default: ``batch.dali_inputs()``). Errors on the thread, from
    ``prepare`` too, come out of ``take()``.
    """

    def __init__(
        self,
        plan: ShardPlan,
        read_batch: Callable[[np.ndarray], tuple[list[Any], np.ndarray]],
        *,
        epoch: int,
        start: int,
        seed: int,
        aug: dict[str, float],
        mirror: float,
        depth: int,
        prepare: Callable[[Batch], Any] = Batch.dali_inputs,
    ) -> None:
        self.plan, self.read_batch, self.prepare = plan, read_batch, prepare
        self.seed, self.aug, self.mirror = seed, aug, mirror
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(epoch, start), name="pfc-feeder", daemon=True
        )
        _LIVE.add(self)
        self._thread.start()

    def _batches(self, epoch: int, start: int) -> Iterator[Any]:
        while True:
            indices, _ = self.plan.rank_batches(epoch, start)
            for k, idx in enumerate(indices):
                key = [self.seed, epoch, self.plan.first_position(start, k)]
                params = draw_params(key, self.plan.batch_size, self.aug, self.mirror)
                jpegs, labels = self.read_batch(idx)
                yield self.prepare(Batch(epoch, start, k, idx, jpegs, labels, params))
            epoch, start = epoch + 1, 0

    def _run(self, epoch: int, start: int) -> None:
        try:
            for batch in self._batches(epoch, start):
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._queue.put(exc)

    def take(self) -> list[Any]:
        """The next batch (blocks only while the thread is behind)."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # unblock a put waiting for room
                self._queue.get_nowait()
            self._thread.join(timeout=0.05)
