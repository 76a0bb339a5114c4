"""Storage of one rank's class centres and their optimizer states.

The head and the optimizer touch the shard only through ``gather`` and ``apply_update``, so a
host-memory or disk-backed bank can replace this device-tensor bank without changing them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from pfc_ds.head import seeds
from pfc_ds.head.names import DTYPES
from pfc_ds.head.rounding import RoundingKey, scratch_elements, stochastic_round
from pfc_ds.head.row_files import FileRows
from pfc_ds.head.workspace import Workspace

# Centres are drawn in fixed blocks of global rows, each from its own seeded generator, so the
# same seed gives the same centre for a class at any world size at the cost of at most two
# partly-used blocks per rank.
_INIT_BLOCK = 8192
_INIT_STD = 0.01
STORAGE_DTYPES = tuple(DTYPES.values())


def init_centres(
    seed: int,
    class_start: int,
    num_local: int,
    embedding_size: int,
    dtype: torch.dtype,
    threads: int | None = None,
) -> torch.Tensor:
    """N(0, 0.01) rows ``class_start .. class_start + num_local``, independent of the sharding.

    Blocks are independent, so ``threads`` (default: torch's intra-op thread count) draw them
    in parallel: a seeded ``randn`` is serial, and tens of millions of rows would otherwise take
    about 0.6 s per million rows of D=128 on one core.
    """
    out = torch.empty(num_local, embedding_size, dtype=dtype)
    end = class_start + num_local
    blocks = range(class_start // _INIT_BLOCK, (end - 1) // _INIT_BLOCK + 1 if num_local else 0)

    def fill(block: int) -> None:
        lo = block * _INIT_BLOCK
        gen = torch.Generator().manual_seed(seeds.centre_block(seed, block))
        rows = torch.randn(_INIT_BLOCK, embedding_size, generator=gen).mul_(_INIT_STD)
        a, b = max(lo, class_start), min(lo + _INIT_BLOCK, end)
        out[a - class_start : b - class_start] = rows[a - lo : b - lo]

    threads = min(threads or torch.get_num_threads(), len(blocks))
    if threads <= 1:
        for block in blocks:
            fill(block)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fill, blocks))
    return out


# Gathers that change dtype stage at most this many elements at a time (16 MB of fp32).
GATHER_BLOCK = 1 << 22


# Per-row optimizer states a bank may hold beside the weight (all sharded like it): SGD's
# momentum; AdamW's moments and per-row step counts.
ROW_STATES = ("momentum", "exp_avg", "exp_avg_sq", "steps")


@dataclass(frozen=True)
class RowIndex:
    """Local rows of one step, where the compute needs them and where the bank keeps them.

    ``device``: on the compute device (the sampler's output, the rounding's row ids);
    ``storage``: the same rows on the bank's storage device (the same tensor for a device
    bank); ``ready``: a CUDA event the storage copy completes at (``None``: complete).
    """

    device: torch.Tensor
    storage: torch.Tensor
    ready: object = None

    def __len__(self) -> int:
        return self.device.shape[0]

    def __getitem__(self, s: slice) -> RowIndex:
        return RowIndex(self.device[s], self.storage[s], self.ready)


@dataclass(frozen=True)
class DirectRows:
    """A device bank's own tensors, lent to an update that writes its rows directly: weight
    first, then the named states, in their storage dtypes; ``keys``: this step's rounding key
    of each (``RoundingKey.key``); ``row_offset``: the global id of local row 0."""

    tensors: tuple[torch.Tensor, ...]
    keys: tuple[tuple[int, int], ...]
    row_offset: int


class CenterBank:
    """Weight rows of a contiguous shard and their optimizer states, kept on one device.

    ``states`` holds the per-row optimizer tensors by name (``ROW_STATES``): row-shaped ones in
    ``momentum_dtype``, ``steps`` as one int32 per row. Half-precision storage (fp16, bf16) is
    written with stochastic rounding keyed by ``(seed, step, tensor, global row, column)``
    (``rounding``); ``row_offset`` is the global id of local row 0.

    Every write goes through ``apply_update``/``write_state``/``load``, which keep a device flag
    of whether every value written is finite (``all_finite``): a save never reads the bank to
    find out (for a disk bank that would read every page).

    ``storage`` is where the tensors live and ``device`` where gathered rows go and updates
    come from; here both are the same device (``resident``: the head may read ``weight``
    itself). ``HostBank`` and ``DiskBank`` keep them apart behind the same methods.
    """

    resident = True

    # An offloaded bank's lane counters (seconds and bytes of its gathers and writes, summed
    # since built or reset); a device bank moves nothing and has none.
    lane: dict[str, float] | None = None

    def __init__(
        self,
        weight: torch.Tensor,
        momentum_dtype: torch.dtype | None = None,
        *,
        row_offset: int = 0,
        seed: int = 0,
    ) -> None:
        if weight.dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {weight.dtype}")
        momentum_dtype = momentum_dtype or weight.dtype
        if momentum_dtype not in (weight.dtype, torch.float32):
            raise ValueError(
                f"momentum dtype must be the storage dtype ({weight.dtype}) or float32, "
                f"got {momentum_dtype}"
            )
        self.weight = weight
        self.states: dict[str, torch.Tensor] = {}  # allocated by ensure_state()
        self.momentum_dtype = momentum_dtype
        self.row_offset = row_offset
        self.rounding = RoundingKey(seed)
        self._staging = Workspace(self.device)  # reused gather, rounding and flag buffers
        self._finite: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def storage(self) -> torch.device:
        return self.weight.device

    def flush(self) -> None:
        """Finish outstanding writes (none here: every write is done when it returns)."""

    @property
    def momentum(self) -> torch.Tensor | None:
        return self.states.get("momentum")

    def nbytes(self) -> dict[str, int]:
        """Bytes of the weight, of the optimizer row states, and of the staging buffers."""
        return {
            "bank": self.weight.numel() * self.weight.element_size(),
            "optimizer_state": sum(v.numel() * v.element_size() for v in self.states.values()),
            "staging": self._staging.nbytes(),
        }

    def to(self, device: torch.device) -> None:
        self.weight = self.weight.to(device)
        self.states = {k: v.to(device) for k, v in self.states.items()}
        self._staging = Workspace(device)
        self._finite = None if self._finite is None else self._finite.to(device)

    def _shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name not in ROW_STATES:
            raise ValueError(f"unknown row state {name!r}; allowed: {', '.join(ROW_STATES)}")
        if name == "steps":
            return (self.weight.shape[0],), torch.int32
        return tuple(self.weight.shape), self.momentum_dtype

    def ensure_state(self, name: str) -> torch.Tensor:
        """Allocate a row state now (zeros), not as a spike at the first update."""
        if name not in self.states:
            shape, dtype = self._shape_dtype(name)
            self.states[name] = self._new_state(name, shape, dtype)
        return self.states[name]

    def _new_state(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.storage)

    def _drop_states(self) -> None:
        self.states = {}

    def load(
        self, weight: torch.Tensor | FileRows, states: dict[str, torch.Tensor | FileRows | None]
    ) -> None:
        """Copy a saved shard in (shapes checked; the storage dtypes stay this bank's). Rows
        still in files (``FileRows``) are read a chunk at a time. A checkpoint was checked
        finite before it was written, so the finite flag starts over."""
        self.flush()
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"head weight shape {tuple(weight.shape)} != {tuple(self.weight.shape)}"
            )
        if isinstance(weight, FileRows) and not weight.covers_all():
            raise ValueError(
                f"head weight files cover {weight.pieces}, not all {weight.shape[0]} rows"
            )
        self._load_rows("weight", self.weight, weight)
        self._drop_states()
        for name, value in states.items():
            if value is None:
                continue
            shape, _ = self._shape_dtype(name)
            if tuple(value.shape) != shape:
                raise ValueError(f"head {name} shape {tuple(value.shape)} != {shape}")
            self._load_rows(name, self.ensure_state(name), value)
        self._finite = None

    def _load_rows(self, name: str, target: torch.Tensor, value: torch.Tensor | FileRows) -> None:
        if isinstance(value, FileRows):
            value.read_into(target)
        else:
            target.copy_(value)

    def file_rows(self) -> dict[str, FileRows]:
        """The tensors that already are files (a disk bank's), so a save can copy files."""
        return {}

    # ---- rows of a step ----------------------------------------------------------------------

    def index(self, rows: torch.Tensor) -> RowIndex:
        """``rows`` (local, on the compute device) as a ``RowIndex`` of this bank."""
        return RowIndex(rows, rows)

    def release(self, rows: RowIndex) -> None:
        """The step is done with ``rows`` (an offloaded bank reuses their host buffer)."""

    def _rows(self, rows: torch.Tensor | RowIndex) -> RowIndex:
        return rows if isinstance(rows, RowIndex) else self.index(rows)

    def _gather(
        self,
        src: torch.Tensor,
        rows: torch.Tensor,
        out: torch.Tensor | None,
        staging: Workspace | None = None,
    ) -> torch.Tensor:
        """``src[rows]`` where both live (``out``: any dtype; ``staging``: where a
        dtype-changing gather stages its blocks, ``self._staging`` by default)."""
        if out is None:
            return src.index_select(0, rows).float()
        if src.dtype == out.dtype:
            return torch.index_select(src, 0, rows, out=out)
        # Through a staging block in the source dtype: its size is a block, not the gather's.
        staging = staging or self._staging
        per_row = out[0].numel() if out.dim() > 1 and out.shape[0] else 1
        step = max(1, GATHER_BLOCK // max(per_row, 1))
        for r0 in range(0, out.shape[0], step):
            r1 = min(out.shape[0], r0 + step)
            staged = staging.get("gather", (r1 - r0, *out.shape[1:]), src.dtype)
            out[r0:r1].copy_(torch.index_select(src, 0, rows[r0:r1], out=staged))
        return out

    def _gather_rows(self, src: torch.Tensor, rows: RowIndex, out: torch.Tensor | None) -> Pending:
        """Start ``src[rows]`` into ``out`` on the compute device (here: done at once, ordered
        on the compute stream like any kernel)."""
        return Pending(None, self._gather(src, rows.storage, out))

    def gather(
        self, rows: torch.Tensor | RowIndex, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Copy of the weight ``rows``: fp32, or ``out``'s dtype when given."""
        return self.gather_async(self._rows(rows), out).wait()

    def gather_async(self, rows: RowIndex, out: torch.Tensor | None) -> Pending:
        """Start gathering the weight ``rows``; ``wait()`` returns them on the compute device."""
        return self._gather_rows(self.weight, rows, out)

    def gather_state(
        self, name: str, rows: torch.Tensor | RowIndex, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Copy of a row state's ``rows`` (fp32 or ``out``'s dtype; zeros while it is absent)."""
        return self.gather_state_async(name, self._rows(rows), out).wait()

    def gather_state_async(self, name: str, rows: RowIndex, out: torch.Tensor | None) -> Pending:
        if name not in self.states:
            shape, _ = self._shape_dtype(name)
            shape = (len(rows), *shape[1:])
            zeros = torch.zeros(shape, device=self.device) if out is None else out.zero_()
            return Pending(None, zeros)
        return self._gather_rows(self.states[name], rows, out)

    # ---- writes ------------------------------------------------------------------------------

    def next_step(self) -> None:
        """An optimizer step begins: its writes round with a fresh key."""
        self.rounding.advance()

    def all_finite(self) -> torch.Tensor:
        """0-dim device bool: every value written since the bank was built or loaded was
        finite (the initial centres are). Never read back here."""
        if self._finite is None:
            self._finite = torch.ones((), dtype=torch.bool, device=self.device)
        return self._finite

    def _note(self, values: torch.Tensor, dtype: torch.dtype) -> None:
        """Fold ``values`` (fp32 rows about to be stored in ``dtype``) into the finite flag:
        one min-max pass over the fp32 values (NaN propagates through both), against the
        largest finite value of ``dtype``, so a value that would round to inf in fp16 counts
        too (checking the stored half values would cost a conversion first)."""
        if values.is_floating_point() and values.numel():
            limit = torch.finfo(dtype).max
            low, high = torch.aminmax(values)
            self._finite = self.all_finite() & (low >= -limit) & (high <= limit)

    def _store(self, x: torch.Tensor, dtype: torch.dtype, rows: RowIndex, stream: str):
        """``x`` (fp32 rows on the compute device) in ``dtype``: stochastically rounded for
        fp16/bf16, cast for integers, as is otherwise."""
        if dtype == x.dtype:
            return x
        if not dtype.is_floating_point:
            return x.to(dtype)
        out = self._staging.get("store", tuple(x.shape), dtype)
        need = scratch_elements(x.shape[0], x.shape[1], x.device)
        scratch = self._staging.get("rounding_bits", (need,), torch.int32)
        global_rows = rows.device + self.row_offset
        return stochastic_round(x, global_rows, self.rounding.key(stream), out, scratch)

    def write_state(
        self, name: str, rows: torch.Tensor | RowIndex, values: torch.Tensor, *, check: bool = True
    ) -> None:
        """Write a row state's ``rows`` back in its dtype; every other row stays bit-identical.
        ``check=False``: the caller's own check already covers these values' finiteness."""
        rows = self._rows(rows)
        state = self.ensure_state(name)
        if check:
            self._note(values, state.dtype)
        self._write(state, rows, self._store(values, state.dtype, rows, name))

    def apply_update(
        self,
        rows: torch.Tensor | RowIndex,
        new_rows: torch.Tensor,
        new_momentum: torch.Tensor | None,
        *,
        in_place: bool = False,
        check_momentum: bool = True,
    ) -> None:
        """Write ``rows`` back in the storage dtypes; every other row stays bit-identical.
        ``in_place``: ``new_rows`` and ``new_momentum`` already are views of the bank's own
        fp32 tensors (a whole-shard update): nothing to write, only the finite flag to keep.
        ``check_momentum=False``: the weights' finite check covers the momentum's (the
        optimizer says when: ``w - lr * buf`` is non-finite wherever an fp32 ``buf`` is)."""
        rows = self._rows(rows)
        if in_place:
            for t in (new_rows, new_momentum if check_momentum else None):
                if t is not None:
                    self._note(t, t.dtype)
            return
        self._note(new_rows, self.weight.dtype)
        self._write(self.weight, rows, self._store(new_rows, self.weight.dtype, rows, "weight"))
        if new_momentum is not None:
            self.write_state("momentum", rows, new_momentum, check=check_momentum)

    def direct_rows(self, *states: str) -> DirectRows | None:
        """The weight and the named row states, for an update that writes its rows itself in
        the pass that computes them (``row_kernels``); ``None`` for an offloaded bank, whose
        writes go through its lane. A direct writer rounds half storage with this step's keys,
        as ``_store`` would, and reports the finiteness of what it wrote to ``note_finite``."""
        if not self.resident:
            return None
        names = ("weight", *states)
        tensors = (self.weight, *(self.ensure_state(name) for name in states))
        keys = tuple(self.rounding.key(name) for name in names)
        return DirectRows(tensors, keys, self.row_offset)

    def note_finite(self, finite: torch.Tensor) -> None:
        """Fold a direct writer's 0-dim device bool (all it wrote is finite) into the flag."""
        self._finite = self.all_finite() & finite

    def _write(self, target: torch.Tensor, rows: RowIndex, values: torch.Tensor) -> None:
        """Store ``values`` (already in ``target``'s dtype) at ``rows``."""
        target.index_copy_(0, rows.storage, values)


class Pending:
    """A gather in flight; ``wait()`` returns its output, ready for the current stream.

    ``future``: the lane job that queues the copy and returns the CUDA event it completes at
    (or ``None``); a device bank's gather is done already (``future`` is ``None``).
    """

    def __init__(self, future, out: torch.Tensor) -> None:
        self._future, self._out = future, out

    def wait(self) -> torch.Tensor:
        if self._future is not None:
            event = self._future.result()
            if event is not None:  # the side stream's copy: order the current stream after it
                torch.cuda.current_stream(self._out.device).wait_event(event)
            self._future = None
        return self._out
