"""Centres beyond device memory: a bank in host RAM, and one in memory-mapped files.

A step touches only its sampled rows, so the shard need not live on the device: ``HostBank``
keeps weights and row states in host memory and moves only the gathered rows to the compute
device and the updated rows back. One worker thread (the "lane") runs every gather and every
write-back in submission order, so a write is always done before any later gather of the same
rows, and a gather can run while the backbone computes (``PartialFC.prefetch``). On a GPU the
lane's copies go through a side stream; on a CPU the same code runs, the lane being the side
stream.

``DiskBank`` keeps each tensor in its own file, mapped into memory, for banks larger than host
RAM: the page cache is the cache, and after every lane job the mapping's resident pages are
released (``MADV_DONTNEED``; dirty data stays in the page cache and goes to disk), so the
process's RSS holds the rows of one job, not the bank.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from pfc_ds.head.bank import CenterBank, init_centres, round_to_bf16, round_to_fp16
from pfc_ds.head.workspace import Workspace


class Pending:
    """A gather running on the lane; ``wait()`` returns its output on the compute device."""

    def __init__(self, future: Future, out: torch.Tensor) -> None:
        self._future, self._out = future, out

    def wait(self) -> torch.Tensor:
        event = self._future.result()
        if event is not None:  # the side stream's copy: order the current stream after it
            torch.cuda.current_stream().wait_event(event)
        return self._out


class HostBank(CenterBank):
    """A ``CenterBank`` whose tensors live in host memory (pinned when the device is a GPU)."""

    resident = False
    pin_storage = True

    def __init__(
        self,
        weight: torch.Tensor,
        device: torch.device | str,
        momentum_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        self.compute = torch.device(device)
        self.pinned = self.compute.type == "cuda"  # copies go through pinned buffers
        if self.pinned and self.pin_storage and not weight.is_pinned():
            weight = weight.pin_memory()
        super().__init__(weight, momentum_dtype, seed)
        self._lane = ThreadPoolExecutor(1, thread_name_prefix="pfc-bank")
        self._last: Future | None = None
        self._stream = torch.cuda.Stream(self.compute) if self.pinned else None
        self._device_ws = Workspace(self.compute)  # rounding happens on the compute device

    @property
    def device(self) -> torch.device:
        return self.compute

    @property
    def storage(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: torch.device) -> None:
        """Only the compute side moves; the rows stay where they are."""
        self.flush()
        self.compute = torch.device(device)
        self._device_ws = Workspace(self.compute)

    def _new_state(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.zeros(shape, dtype=dtype)
        return t.pin_memory() if self.pinned and self.pin_storage else t

    # ---- the lane --------------------------------------------------------------------------

    def _submit(self, job) -> Future:
        self._last = self._lane.submit(job)
        return self._last

    def _after_job(self) -> None:
        """Hook run on the lane after each job (``DiskBank`` releases mapped pages)."""

    def flush(self) -> None:
        if self._last is not None:
            self._last.result()

    def _gather_job(self, src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor):
        def job():
            try:
                if not self.pinned:
                    CenterBank._gather(self, src, rows, out)
                    return None
                host = torch.empty((len(rows), *src.shape[1:]), dtype=src.dtype, pin_memory=True)
                torch.index_select(src, 0, rows, out=host)
                with torch.cuda.stream(self._stream):
                    out.copy_(host, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                return event
            finally:
                self._after_job()

        return job

    def gather_async(self, rows: torch.Tensor, out: torch.Tensor) -> Pending:
        """Start copying the weight ``rows`` (host index) into ``out`` (compute device)."""
        return Pending(self._submit(self._gather_job(self.weight, rows, out)), out)

    def _gather(
        self, src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None
    ) -> torch.Tensor:
        if out is None:
            out = torch.empty((len(rows), *src.shape[1:]), device=self.compute)
        return Pending(self._submit(self._gather_job(src, rows, out)), out).wait()

    def _store(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Round on the compute device (half the bytes to move back)."""
        if dtype == x.dtype or not dtype.is_floating_point:
            return x.to(dtype)
        gen = self.rounding.generator(x.device)
        out = self._device_ws.get("store", tuple(x.shape), dtype)
        rounding = round_to_bf16 if dtype == torch.bfloat16 else round_to_fp16
        return rounding(x, gen, out)

    def _write(self, target: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Queue the write: the lane owns copies of ``rows`` and ``values`` (the caller's
        buffers are reused at once); later gathers of these rows wait behind it."""
        rows = rows.clone()
        event = None
        if self.pinned:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = values.clone()

        def job():
            try:
                if event is not None:
                    event.synchronize()
                target.index_copy_(0, rows, host)
            finally:
                self._after_job()

        self._submit(job)

    def nbytes(self) -> dict[str, int]:
        self.flush()
        out = super().nbytes()
        out["staging"] += self._device_ws.nbytes()
        return out


def _mapped(
    path: Path, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, mmap.mmap]:
    """A tensor over a fresh ``path`` (sparse, i.e. zeros), through a shared mapping."""
    numel = 1
    for n in shape:
        numel *= n
    size = numel * torch.empty((), dtype=dtype).element_size()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w+b") as f:  # an earlier run's file starts over
        f.truncate(size)
        mm = mmap.mmap(f.fileno(), size) if size else None
    if mm is None:
        return torch.empty(shape, dtype=dtype), None
    return torch.frombuffer(mm, dtype=dtype).view(shape), mm


# Rows initialised per chunk before the chunk's mapped pages are released.
_INIT_CHUNK_ROWS = 1 << 19


class DiskBank(HostBank):
    """A ``HostBank`` whose tensors are files in ``path`` (one per tensor and rank).

    ``path`` is scratch space of this run: the files start over when a bank is built, and a
    checkpoint copies them like any other bank's rows.

    The centres are drawn chunk by chunk into the weight file at construction (the same values
    as every other bank: ``init_centres`` is per block of global rows), releasing each chunk's
    pages, so building a bank larger than RAM holds a chunk, not the bank, in memory. Row
    states start as sparse files (zeros).
    """

    pin_storage = False  # a mapped file cannot be pinned; copies still go through pinned buffers

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        seed: int,
        class_start: int,
        num_local: int,
        embedding_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        rank: int,
        world_size: int,
        momentum_dtype: torch.dtype | None = None,
        rounding_seed: int = 0,
    ) -> None:
        self.path = Path(path)
        self.prefix = f"bank_{rank:05d}_of_{world_size:05d}"
        self._maps: dict[str, mmap.mmap] = {}
        weight = self._file("weight", (num_local, embedding_size), dtype)
        for r0 in range(0, num_local, _INIT_CHUNK_ROWS):
            r1 = min(num_local, r0 + _INIT_CHUNK_ROWS)
            weight[r0:r1] = init_centres(seed, class_start + r0, r1 - r0, embedding_size, dtype)
            self._release()
        super().__init__(weight, device, momentum_dtype, rounding_seed)

    def _file(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor, mm = _mapped(self.path / f"{self.prefix}.{name}.bin", shape, dtype)
        if mm is not None:
            self._maps[name] = mm
        return tensor

    def _new_state(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._file(name, shape, dtype)

    def _release(self) -> None:
        for mm in self._maps.values():
            mm.madvise(mmap.MADV_DONTNEED)

    def _after_job(self) -> None:
        self._release()

    def flush(self) -> None:
        """Finish queued writes and push the mapped files' dirty pages to disk."""
        super().flush()
        for mm in self._maps.values():
            mm.flush()
