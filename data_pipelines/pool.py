"""Parallel map for the command-line tools, safe to call from a process that runs DALI.

``fork`` copies a process mid-flight; with DALI's or OpenMP's threads holding locks the child
can deadlock (seen in the test suite). Workers are therefore spawned, and ``workers <= 1`` maps
in this process, which is also what small jobs and tests want.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any


@contextmanager
def mapper(workers: int) -> Iterator[Callable[..., Iterable[Any]]]:
    """Yield a ``map(func, items, chunksize=)`` running on ``workers`` spawned processes."""
    if workers <= 1:
        yield lambda func, items, chunksize=1: map(func, items)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool.map
