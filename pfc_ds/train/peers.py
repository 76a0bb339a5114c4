"""A dead or hung rank: a bounded wait, then one message naming the step and the missing rank.

A collective with a dead or hung peer waits for the process group's timeout
(``train.collective_timeout_s``). gloo then raises in the caller ("Timed out waiting ...",
"Connection closed by peer"), which names neither the training step nor the rank.
``PeerFailure`` does: each survivor posts its rank to the c10d store, waits a moment for the
others, and names the ranks that never posted (``None`` when the store itself is gone).

NCCL reports a timeout asynchronously (its watchdog, under torch's default
``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``,
tears the process down), so the main thread never sees it; ``Watchdog`` covers that case and
any hang outside a collective: no step boundary for the timeout plus a grace period prints the
same message and ends the process. NCCL groups get the timeout plus twice the grace, so this
message comes first; gloo groups get the timeout itself and raise before it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch.distributed as dist

EXIT_CODE = 75  # EX_TEMPFAIL: a peer failed; resume from the last checkpoint
_MARKERS = re.compile(
    r"Timed out|timed out|Connection closed by peer|Connection reset by peer|Broken pipe|"
    r"pair closure|NCCL communicator was aborted|Watchdog caught collective|ProcessGroup.*abort",
)


class PeerFailure(RuntimeError):
    """A collective failed because another rank died or hung; ``report`` says whether this rank
    prints the message (the lowest surviving rank, or every rank when that is unknown)."""

    def __init__(self, message: str, report: bool = True) -> None:
        super().__init__(message)
        self.report = report


def grace_s(timeout_s: float) -> float:
    """How long after the collective timeout the watchdog waits (gloo raises first)."""
    return max(10.0, 0.25 * timeout_s)


def group_timeout(backend: str, timeout_s: float) -> timedelta:
    """The process-group timeout for ``backend``: NCCL's fires after the watchdog's message."""
    extra = 2 * grace_s(timeout_s) if backend == "nccl" else 0.0
    return timedelta(seconds=timeout_s + extra)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed for lack of a peer (not a bug of ours)."""
    dist_errors = tuple(
        getattr(dist, name)
        for name in ("DistBackendError", "DistNetworkError")
        if hasattr(dist, name)
    )
    if dist_errors and isinstance(exc, dist_errors):
        return True
    return isinstance(exc, RuntimeError) and bool(_MARKERS.search(str(exc)))


def missing_ranks(wait_s: float) -> tuple[list[int] | None, bool]:
    """Post this rank as alive, wait up to ``wait_s`` for the others; ``(ranks that never
    posted, whether this rank is the lowest that did)``. ``(None, True)``: no store to ask."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, True
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"pfc_ds/peer_failure/{attempt}"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=max(1.0, wait_s)))
        store.set(f"{prefix}/{rank}", "1")
        count = store.add(f"{prefix}/count", 1)
        deadline = time.monotonic() + wait_s
        while count < world and time.monotonic() < deadline:
            time.sleep(0.1)
            count = store.add(f"{prefix}/count", 0)
        alive = [r for r in range(world) if store.check([f"{prefix}/{r}"])]
    except Exception:  # the store lived on the dead rank (rank 0 without torchrun)
        return None, True
    return [r for r in range(world) if r not in alive], rank == min(alive)


def describe(
    where: str, cause: str, timeout_s: float, wait_s: float, event: str = "a collective failed"
) -> PeerFailure:
    """The ``PeerFailure`` for ``event`` ``where`` (``"in step 12"``)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    missing, report = missing_ranks(wait_s)
    if missing:
        who = f"rank(s) {missing} did not respond (dead or hung)"
    elif missing is None:
        who = "the unresponsive rank is unknown (the rendezvous store did not answer)"
    else:
        who = "every rank responded afterwards (a transient network failure?)"
    return PeerFailure(
        f"rank {rank}: {event} {where}: {who}; train.collective_timeout_s="
        f"{timeout_s:g}. {cause.strip().splitlines()[0][:200]}. Resume from the last complete "
        "checkpoint (train.auto_resume: true under torchrun --max-restarts does it by itself)",
        report=report,
    )


@contextlib.contextmanager
def translated(where: Callable[[], str], timeout_s: float) -> Iterator[None]:
    """Re-raise a collective that failed for a dead or hung peer as ``PeerFailure``, naming
    ``where()`` (what ran then: ``"in step 12"``)."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, PeerFailure) or not is_peer_failure(exc):
            raise
        raise describe(where(), str(exc), timeout_s, report_wait_s(timeout_s)) from exc


def report_wait_s(timeout_s: float) -> float:
    """How long a survivor waits for the other survivors to report before naming the rest."""
    return min(5.0, max(1.0, timeout_s / 4))


class Watchdog:
    """Ends the process when no ``beat`` came for ``timeout_s + grace_s(timeout_s)`` seconds."""

    def __init__(
        self, timeout_s: float, *, wait_s: float = 2.0, grace: float | None = None
    ) -> None:
        self.timeout_s = timeout_s
        self.grace_s = grace_s(timeout_s) if grace is None else grace
        self.deadline_s = timeout_s + self.grace_s
        self.wait_s = wait_s
        self._where = "before the first step"
        self._last = time.monotonic()
        self._paused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pfc_ds-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self.beat(self._where)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def beat(self, where: str) -> None:
        """Progress was made; ``where`` is what runs next (``"in step 12"``)."""
        self._where = where
        self._last = time.monotonic()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Work of unbounded length (evaluation, export): no deadline meanwhile."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self._last = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.deadline_s / 8)):
            idle = time.monotonic() - self._last
            if self._paused or idle < self.deadline_s:
                continue
            failure = describe(
                self._where,
                f"No progress for {idle:.0f} s (the watchdog's limit: the timeout + {self.grace_s:g} s)",
                self.timeout_s,
                self.wait_s,
                event="no progress",
            )
            print(f"train.py: error: {failure}", file=sys.stderr, flush=True)
            os._exit(EXIT_CODE)
