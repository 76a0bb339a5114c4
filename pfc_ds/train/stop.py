"""A preemption request (SIGTERM or SIGINT) that every rank honours after the same step.

Schedulers signal one process (Kubernetes, SLURM, ``train.sh``'s PID); ranks may also be
signalled at different moments. The handler only sets a flag; the flag is all-reduced (MAX) at
each optimizer-step boundary, so every rank sees the request at the same step, saves together and
stops.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """``with StopRequest(group) as stop: ... if stop.agreed(): save, return``.

    ``group`` is a gloo process group (``None``: the default one, when that is gloo): the flag
    is a host tensor, so agreeing on it never waits for the GPU's queued work.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.signal_name: str | None = None
        self._restore: list[Callable[[], object]] = []

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous = signal.getsignal(sig)
                signal.signal(sig, self._handler)
                self._restore.append(lambda s=sig, p=previous: signal.signal(s, p))
        return self

    def __exit__(self, *exc) -> None:
        while self._restore:
            self._restore.pop()()

    def _handler(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any rank was signalled; collective, called at every step boundary."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.signal_name is not None
        flag = torch.tensor([0 if self.signal_name is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item() > 0)
