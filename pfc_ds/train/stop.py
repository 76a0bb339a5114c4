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
    """``with StopRequest() as stop: ... if stop.agreed(device): save, return``."""

    def __init__(self) -> None:
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

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was signalled; collective, called at every step boundary."""
        flag = torch.tensor([0.0 if self.signal_name is None else 1.0])
        if not (dist.is_available() and dist.is_initialized()):
            return self.signal_name is not None
        if dist.get_backend() != "gloo":
            flag = flag.to(device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
