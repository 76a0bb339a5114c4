"""A preemption request (SIGTERM or SIGINT) that every rank honours after the same step.

Schedulers signal one process (Kubernetes, SLURM, ``train.sh``'s PID); ranks may also be
signalled at different moments. The handler only sets a flag; the flag is all-reduced (MAX) at
each optimizer-step boundary, so every rank sees the request at the same step, saves together and
stops.

A second signal while a checkpoint is being written means "now": the process exits at once
(128 + signal), leaving the previous checkpoint as it was (the new tag has no ``meta.json``, so
no resume reads it). Python runs signal handlers only between bytecodes, and a rank waiting in a
collective or a large write would not get there, so a thread reads the signal numbers from
``signal.set_wakeup_fd`` (written by the C-level handler at once) and makes that decision.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

log = logging.getLogger("pfc_ds.train")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """``with StopRequest(group) as stop: ... if stop.agreed(): save, return``.

    ``group`` is a gloo process group (``None``: the default one, when that is gloo): the flag
    is a host tensor, so agreeing on it never waits for the GPU's queued work. Wrap checkpoint
    writes in ``with stop.saving(step):``.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.signal_name: str | None = None
        self._restore: list[Callable[[], object]] = []
        self._received = 0  # SIGTERM/SIGINT seen by the wakeup thread
        self._saving: int | None = None  # the step being saved

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous = signal.getsignal(sig)
                signal.signal(sig, self._handler)
                self._restore.append(lambda s=sig, p=previous: signal.signal(s, p))
            self._watch_wakeup_fd()
        return self

    def __exit__(self, *exc) -> None:
        while self._restore:
            self._restore.pop()()

    def _watch_wakeup_fd(self) -> None:
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        thread = threading.Thread(target=self._read_signals, args=(reader,), daemon=True)
        thread.start()

        def restore() -> None:
            signal.set_wakeup_fd(previous)
            writer.close()  # the reader sees EOF and its thread ends
            thread.join(timeout=1)
            reader.close()

        self._restore.append(restore)

    def _read_signals(self, reader: socket.socket) -> None:
        while data := reader.recv(64):
            for signum in data:
                if signum not in SIGNALS:
                    continue
                self._received += 1
                if self._saving is not None and self._received >= 2:
                    name = signal.Signals(signum).name
                    os.write(
                        2,
                        f"{name} again while writing the checkpoint of step {self._saving}: "
                        "exiting now without it; the previous checkpoint is intact\n".encode(),
                    )
                    os._exit(128 + signum)

    def _handler(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @contextlib.contextmanager
    def saving(self, step: int) -> Iterator[None]:
        """A checkpoint write: a further signal during it ends the process at once."""
        self._saving = step
        try:
            yield
        finally:
            self._saving = None

    def agreed(self) -> bool:
        """Whether any rank was signalled; collective, called at every step boundary."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.signal_name is not None
        flag = torch.tensor([0 if self.signal_name is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item() > 0)

    def announce(self, saved: bool, step: int, rank: int) -> None:
        """The stop's log line: from the signalled ranks, and rank 0."""
        if self.signal_name is not None or rank == 0:
            why = self.signal_name or "a signal to another rank"
            log.warning("%s: %s step %d, stopping", why, "saved" if saved else "could not save",
                        step)  # fmt: skip
