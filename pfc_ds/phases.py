"""Named, nested time spans of a training step: free when no clock is installed.

Code marks its phases with ``with phases.span("head_fwd"):`` (or ``begin``/``end`` where a
phase starts and ends in different callbacks, as the head's backward does). With no clock
installed ``span`` returns one shared no-op context: nothing is timed, recorded or synced.

A ``PhaseClock`` times the spans with host timers, or with CUDA events on a GPU: host timers
bill asynchronous GPU work to whichever span hits the next sync, events time it where it runs.
Spans nest; ``collect`` reports each span's *exclusive* time (its own, less its children's),
so the phases of a step add up to the step, and resolves events with one sync per call.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

_NULL = nullcontext()
_clock: PhaseClock | None = None


class PhaseClock:
    """Records spans as (name, parent, start, end); ``events``: CUDA events, else host time."""

    def __init__(self, events: bool = False) -> None:
        self.events = events
        self._records: list[list[Any]] = []  # [name, parent index, start, end, fixed_ms]
        self._stack: list[int] = []

    def _now(self):
        if self.events:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def begin(self, name: str) -> None:
        parent = self._stack[-1] if self._stack else -1
        self._records.append([name, parent, self._now(), None, None])
        self._stack.append(len(self._records) - 1)

    def end(self, name: str) -> None:
        """Close the innermost open ``name`` and any span opened inside it; no such span is
        ignored (a timing mismatch must never stop training)."""
        names = [self._records[i][0] for i in self._stack]
        if name not in names:
            return
        now = self._now()
        while self._stack:
            i = self._stack.pop()
            self._records[i][3] = now
            if self._records[i][0] == name:
                return

    @contextmanager
    def span(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def add(self, name: str, ms: float) -> None:
        """A span of known length inside the open span (e.g. a communication op's latency)."""
        parent = self._stack[-1] if self._stack else -1
        self._records.append([name, parent, None, None, ms])

    def _ms(self, rec) -> float:
        _, _, start, end, fixed = rec
        if fixed is not None:
            return fixed
        return start.elapsed_time(end) if self.events else (end - start) * 1e3

    def collect(self) -> dict[str, float]:
        """Exclusive ms per span name since the last call (one sync); no span may be open."""
        if self._stack:
            raise RuntimeError(
                f"collect() while phase {self._records[self._stack[-1]][0]!r} is open"
            )
        if self.events:
            torch.cuda.synchronize()
        exclusive = [self._ms(r) for r in self._records]
        for rec in self._records:
            if rec[1] >= 0:
                exclusive[rec[1]] -= self._ms(rec)
        out: dict[str, float] = defaultdict(float)
        for rec, ms in zip(self._records, exclusive, strict=True):
            out[rec[0]] += ms
        self._records = []
        return dict(out)


def install(clock: PhaseClock | None) -> PhaseClock | None:
    """Make ``clock`` the one that ``span``/``begin``/``end`` report to; returns the old one."""
    global _clock
    old, _clock = _clock, clock
    return old


def active() -> PhaseClock | None:
    return _clock


def span(name: str):
    return _NULL if _clock is None else _clock.span(name)


def begin(name: str) -> None:
    if _clock is not None:
        _clock.begin(name)


def end(name: str) -> None:
    if _clock is not None:
        _clock.end(name)
