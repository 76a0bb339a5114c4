"""Centres beyond device memory: a bank in host RAM, and one in memory-mapped files.

A step touches only its sampled rows, so the shard need not live on the device: ``HostBank``
keeps weights and row states in host memory and moves only the gathered rows to the compute
device and the updated rows back. One worker thread (the "lane") runs every gather and every
write-back in submission order, so a write is always done before any later gather of the same
rows, and a gather can run while the backbone computes (``PartialFC.prefetch``). On a GPU the
lane's copies go through a side stream; on a CPU the same code runs, the lane being the side
stream.

``DiskBank`` keeps each tensor in its own file, mapped into memory, for banks larger than host
RAM: the page cache is the cache. Gathers and writes go through the file in sorted order, one
64 MB window at a time, releasing each window's pages from the process (``MADV_DONTNEED``;
dirty data stays in the page cache and goes to disk), so the process's RSS holds a window, not
the bank.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from pfc_ds.head.bank import CenterBank, Pending, RowIndex, init_centres
from pfc_ds.head.row_files import FileRows, copy_range
from pfc_ds.head.workspace import Workspace


def register_pinned(t: torch.Tensor) -> None:
    """Page-lock ``t``'s memory where it is (``cudaHostRegister``): no pageable copy first, as
    ``pin_memory()`` makes, and no rounding up to a power of two, as the caching host allocator
    does: a pinned bank takes exactly its bytes."""
    if t.numel() == 0:
        return
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {t.numel() * t.element_size()} bytes: {err}")


def unregister_pinned(t: torch.Tensor) -> None:
    if t.numel():
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class PinnedPool:
    """Reused host buffers for the lane's device copies (page-locked when the device is a GPU):
    pinning memory costs far more than the copy (it maps every page), so after the first step
    no buffer is allocated again. Buffers are pinned in place at their size (no power-of-two
    rounding). A buffer is reused once the copies that read or wrote it are done (``busy()``
    false); the pool grows only while every buffer is busy."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._free: list[torch.Tensor] = []
        self._busy: list[tuple[torch.Tensor, object]] = []
        self._lock = threading.Lock()
        self._registered: list[torch.Tensor] = []
        weakref.finalize(self, _unregister_all, self._registered)

    def _allocate(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if self.pin:
            register_pinned(buf)
            self._registered.append(buf)
        return buf

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``shape``/``dtype`` view of a free buffer, and the buffer (for ``lend``)."""
        need = math.prod(shape) * dtype.itemsize
        with self._lock:
            still = []
            for buf, busy in self._busy:
                (still.append((buf, busy)) if busy() else self._free.append(buf))
            self._busy = still
            fits = [i for i, b in enumerate(self._free) if b.numel() >= need]
            if fits:  # the smallest that fits (by index: ``==`` on tensors compares values)
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            else:
                buf = self._allocate(max(need, 1))
        return buf[:need].view(dtype).view(shape), buf

    def lend(self, buf: torch.Tensor, busy) -> None:
        """Give ``buf`` back, in use until ``busy()`` returns false."""
        with self._lock:
            self._busy.append((buf, busy))

    def nbytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free) + sum(b.numel() for b, _ in self._busy)


class HostBank(CenterBank):
    """A ``CenterBank`` whose tensors live in host memory (page-locked when the device is a
    GPU), and whose rows travel to the compute device and back.

    The CUDA ordering, all by events (the main thread never waits for the GPU):

    * the step's sampled index is copied to a pinned host buffer on the compute stream, with a
      blocking-sync event the lane waits on before it reads rows (``index``);
    * a gather's host-to-device copy runs on a side stream that first waits for the compute
      stream's position at submission (the shared row buffer's earlier readers), and the
      compute stream waits for the copy's event when it needs the rows (``Pending.wait``);
    * a write's device-to-host copy runs on the compute stream into a pinned buffer, and the
      lane waits for its event before copying the rows into the bank.
    """

    resident = False
    pin_storage = True

    def __init__(
        self,
        weight: torch.Tensor,
        device: torch.device | str,
        momentum_dtype: torch.dtype | None = None,
        *,
        row_offset: int = 0,
        seed: int = 0,
    ) -> None:
        self.compute = torch.device(device)
        self._registered: list[torch.Tensor] = []  # page-locked in place (unregistered at exit)
        super().__init__(weight, momentum_dtype, row_offset=row_offset, seed=seed)
        self._lane = ThreadPoolExecutor(1, thread_name_prefix="pfc-bank")
        self._last: Future | None = None
        self._host_staging = Workspace(torch.device("cpu"))  # dtype-changing host reads
        self._index_buffers: dict[int, torch.Tensor] = {}  # host index -> its pool buffer
        self._bind()
        # Seconds the lane spent and bytes it moved, by kind: what pfc_ds.scale reports.
        self.lane = {"gather_s": 0.0, "gather_bytes": 0, "write_s": 0.0, "write_bytes": 0}
        weakref.finalize(self, _unregister_all, self._registered)

    def _bind(self) -> None:
        """Set up the copies for the compute device: ``remote`` (rows cross to another
        device), ``cuda`` (pinned buffers, a side stream and events)."""
        self.remote = self.compute.type != "cpu"
        self.cuda = self.compute.type == "cuda"
        self._stream = torch.cuda.Stream(self.compute) if self.cuda else None
        self._pool = PinnedPool(self.cuda)
        if self.cuda and self.pin_storage:
            for t in (self.weight, *self.states.values()):
                self._pin(t)

    def _pin(self, t: torch.Tensor) -> torch.Tensor:
        if self.cuda and self.pin_storage and not any(t is r for r in self._registered):
            register_pinned(t)
            self._registered.append(t)
        return t

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
        self._staging = Workspace(self.compute)
        self._finite = None if self._finite is None else self._finite.to(self.compute)
        self._bind()

    def _new_state(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._pin(torch.zeros(shape, dtype=dtype))

    def _drop_states(self) -> None:
        self.flush()
        for t in self.states.values():
            for i, r in enumerate(self._registered):
                if r is t:
                    unregister_pinned(self._registered.pop(i))
                    break
        self.states = {}

    # ---- the lane --------------------------------------------------------------------------

    def _submit(self, job) -> Future:
        self._last = self._lane.submit(job)
        return self._last

    def flush(self) -> None:
        if self._last is not None:
            self._last.result()

    def index(self, rows: torch.Tensor) -> RowIndex:
        """The step's rows on the host too: copied without blocking into a pinned buffer that
        the lane reads once the copy's event is reached (a host index given is copied to the
        compute device instead, for callers outside the step)."""
        if not self.remote:
            return RowIndex(rows, rows)
        if rows.device.type == "cpu":
            return RowIndex(rows.to(self.compute), rows)
        host, buf = self._pool.take(tuple(rows.shape), rows.dtype)
        host.copy_(rows, non_blocking=True)
        ready = None
        if self.cuda:
            ready = torch.cuda.Event(blocking=True)
            ready.record()
        self._index_buffers[host.data_ptr()] = buf
        return RowIndex(rows, host, ready)

    def release(self, rows: RowIndex) -> None:
        """The pinned index buffer goes back to the pool once the lane's jobs (which may
        still read it) are done."""
        buf = self._index_buffers.pop(rows.storage.data_ptr(), None)
        if buf is not None:
            last = self._last
            self._pool.lend(buf, lambda: last is not None and not last.done())

    def _gather_rows(self, src: torch.Tensor, rows: RowIndex, out: torch.Tensor | None) -> Pending:
        """Queue ``src[rows]`` into ``out`` (compute device) on the lane."""
        if out is None:
            out = torch.empty((len(rows), *src.shape[1:]), device=self.compute)
        after = None
        if self.cuda:  # out's earlier readers: the side stream's copy waits for them
            after = torch.cuda.Event()
            after.record()

        def job():
            t0 = time.perf_counter()
            try:
                if rows.ready is not None:
                    rows.ready.synchronize()
                if not self.remote:
                    self._read(src, rows.storage, out)
                    return None
                host, buf = self._pool.take((len(rows), *src.shape[1:]), src.dtype)
                self._read(src, rows.storage, host)
                if not self.cuda:  # another device that is not a GPU: its own copy
                    out.copy_(host, non_blocking=True)
                    self._pool.lend(buf, lambda: False)
                    return None
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(after)
                    out.copy_(host, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self._stream)
                self._pool.lend(buf, lambda: not done.query())
                return done
            finally:
                self.lane["gather_s"] += time.perf_counter() - t0
                self.lane["gather_bytes"] += len(rows) * src[0].numel() * src.element_size()

        return Pending(self._submit(job), out)

    def _read(self, src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        """On the lane: ``out = src[rows]`` (``out`` on the host; any dtype)."""
        CenterBank._gather(self, src, rows, out, self._host_staging)

    def _copy_in(self, target: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """On the lane: ``target[rows] = values``."""
        target.index_copy_(0, rows, values)

    def _write(self, target: torch.Tensor, rows: RowIndex, values: torch.Tensor) -> None:
        """Queue the write: the lane owns a copy of ``values`` (the caller's buffer is reused at
        once); later gathers of these rows wait behind it."""
        host, buf = self._pool.take(tuple(values.shape), values.dtype)
        host.copy_(values, non_blocking=self.remote)
        ready = None
        if self.cuda:
            ready = torch.cuda.Event(blocking=True)
            ready.record()

        def job():
            t0 = time.perf_counter()
            try:
                if ready is not None:
                    ready.synchronize()
                if rows.ready is not None:
                    rows.ready.synchronize()
                self._copy_in(target, rows.storage, host)
            finally:
                self.lane["write_s"] += time.perf_counter() - t0
                self.lane["write_bytes"] += host.numel() * host.element_size()

        done = self._submit(job)
        self._pool.lend(buf, lambda: not done.done())

    def nbytes(self) -> dict[str, int]:
        self.flush()
        out = super().nbytes()
        out["staging"] += self._host_staging.nbytes() + self._pool.nbytes()
        return out


def _unregister_all(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        with contextlib.suppress(Exception):  # at interpreter exit CUDA may be gone already
            unregister_pinned(t)
    tensors.clear()


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


# Rows initialised per chunk before the chunk's mapped pages are released, and the file window
# a gather or write touches before it releases that window's pages.
_INIT_CHUNK_ROWS = 1 << 18
_WINDOW_BYTES = 64 * 2**20


class DiskBank(HostBank):
    """A ``HostBank`` whose tensors are files in ``path`` (one per tensor and rank).

    ``path`` is scratch space of this run: the files start over when a bank is built. A
    checkpoint is a copy of them (``file_rows``), and a load or reshard copies row ranges of
    a checkpoint's files into them, so neither brings the bank through memory.

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
        super().__init__(weight, device, momentum_dtype, row_offset=class_start, seed=rounding_seed)

    def _file(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor, mm = _mapped(self.path / f"{self.prefix}.{name}.bin", shape, dtype)
        if mm is not None:
            self._maps[name] = mm
        return tensor

    def _new_state(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._file(name, shape, dtype)

    def _release(self, src: torch.Tensor | None = None, r0: int = 0, r1: int = 0) -> None:
        """Drop this process's mapped pages: all, or rows ``r0:r1`` of ``src``'s file."""
        if src is None:
            for mm in self._maps.values():
                mm.madvise(mmap.MADV_DONTNEED)
            return
        mm = self._map_of(src)
        row = src[0].numel() * src.element_size()
        page = mmap.PAGESIZE
        start = (r0 * row) // page * page
        mm.madvise(mmap.MADV_DONTNEED, start, min(len(mm), r1 * row) - start)

    def _map_of(self, t: torch.Tensor) -> mmap.mmap:
        for name, mm in self._maps.items():
            if (self.weight if name == "weight" else self.states.get(name)) is t:
                return mm
        raise KeyError("tensor is not one of this bank's files")

    def _windows(self, src: torch.Tensor, rows: torch.Tensor):
        """Sorted rows cut by windows of the file: ``(sorted rows, their positions, [(i0, i1,
        r0, r1)])``, so each window's pages are released before the next is touched."""
        ranked, perm = rows.sort(stable=True)  # repeated rows: the last write wins, as on a device
        per = max(1, _WINDOW_BYTES // (src[0].numel() * src.element_size()))
        edges = torch.arange(0, src.shape[0] + per, per)
        cuts = torch.searchsorted(ranked, edges).tolist()
        spans = [
            (cuts[k], cuts[k + 1], int(edges[k]), int(min(edges[k + 1], src.shape[0])))
            for k in range(len(cuts) - 1)
            if cuts[k + 1] > cuts[k]
        ]
        return ranked, perm, spans

    def _read(self, src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        ranked, perm, spans = self._windows(src, rows)
        for i0, i1, r0, r1 in spans:
            part = torch.empty((i1 - i0, *out.shape[1:]), dtype=out.dtype)
            CenterBank._gather(self, src, ranked[i0:i1], part)
            out.index_copy_(0, perm[i0:i1], part)
            self._release(src, r0, r1)

    def _copy_in(self, target: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        ranked, perm, spans = self._windows(target, rows)
        for i0, i1, r0, r1 in spans:
            target.index_copy_(0, ranked[i0:i1], values.index_select(0, perm[i0:i1]))
            self._release(target, r0, r1)

    def flush(self) -> None:
        """Finish queued writes and push the mapped files' dirty pages to disk."""
        super().flush()
        for mm in self._maps.values():
            mm.flush()

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name`` (``weight`` or a row state)."""
        return self.path / f"{self.prefix}.{name}.bin"

    def file_rows(self) -> dict[str, FileRows]:
        """Every tensor as its whole file: a checkpoint copies these instead of the rows."""
        self.flush()
        tensors = {"weight": self.weight, **self.states}
        return {
            name: FileRows(tuple(t.shape), t.dtype, ((self.file_of(name), 0, 0, t.shape[0]),))
            for name, t in tensors.items()
        }

    def _load_rows(self, name: str, target: torch.Tensor, value: torch.Tensor | FileRows) -> None:
        """Rows in files of this bank's dtype are copied in the kernel, window by window of
        the target; anything else (a tensor, another dtype) is read a chunk at a time."""
        b = target[0].numel() * target.element_size()
        per = max(1, _WINDOW_BYTES // b)
        if isinstance(value, torch.Tensor):
            for r0 in range(0, target.shape[0], per):
                r1 = min(target.shape[0], r0 + per)
                target[r0:r1].copy_(value[r0:r1])
                self._release(target, r0, r1)
            return
        if value.dtype != target.dtype:
            value.read_into(target, lambda r0, r1: self._release(target, r0, r1))
            return
        with open(self.file_of(name), "r+b") as fo:
            for path, src_row, dst_row, rows in value.pieces:
                for k in range(0, rows, per):
                    n = min(per, rows - k)
                    copy_range(path, fo, (src_row + k) * b, (dst_row + k) * b, n * b)
                    self._release(target, dst_row + k, dst_row + k + n)
