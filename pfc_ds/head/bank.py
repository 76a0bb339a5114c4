"""Storage of one rank's class centres and their optimizer states.

The head and the optimizer touch the shard only through ``gather`` and ``apply_update``, so a
host-memory or disk-backed bank can replace this device-tensor bank without changing them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from pfc_ds.head import seeds
from pfc_ds.head.row_files import FileRows
from pfc_ds.head.step_rng import StepRng
from pfc_ds.head.workspace import Workspace

# Centres are drawn in fixed blocks of global rows, each from its own seeded generator, so the
# same seed gives the same centre for a class at any world size at the cost of at most two
# partly-used blocks per rank.
_INIT_BLOCK = 8192
_INIT_STD = 0.01
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
_GATHER_BLOCK = 1 << 22

# Stochastic rounding works through a row block of about this many elements at a time, so its
# temporaries stay a few MB whatever the number of sampled rows.
_SR_BLOCK = 1 << 20


def _row_blocks(x: torch.Tensor):
    per_row = x[0].numel() if x.dim() > 1 and x.shape[0] else 1
    rows = max(1, _SR_BLOCK // max(1, per_row))
    for r0 in range(0, x.shape[0], rows):
        yield r0, min(x.shape[0], r0 + rows)


def round_to_bf16(
    x: torch.Tensor, generator: torch.Generator, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Stochastically round fp32 to bf16: unbiased, so small updates survive in expectation.

    bf16 keeps 8 mantissa bits; round-to-nearest drops any update below 2^-9 of the weight,
    which stalls training (measured on the problem of tests/test_head_precision.py: 32% higher
    final loss than fp32 storage with nearest rounding, 0.14% with this).
    bf16 is the high half of fp32, so adding 16 random low bits and truncating is exact SR.
    """
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device) if out is None else out
    for r0, r1 in _row_blocks(x):
        bits = x[r0:r1].view(torch.int32)
        noise = _random_bits(bits.shape, 16, x.device, generator)
        out[r0:r1] = noise.add_(bits).bitwise_and_(-65536).view(torch.float32)
    return out


def _random_bits(shape, bits: int, device, generator) -> torch.Tensor:
    """Uniform ``bits``-bit int32 values; each 32-bit draw serves two elements (the RNG, not
    the arithmetic, is what stochastic rounding costs on a CPU)."""
    n = 1
    for d in shape:
        n *= d
    draws = torch.randint(
        -(1 << 31), 1 << 31, ((n + 1) // 2,), dtype=torch.int32, device=device, generator=generator
    )
    mask = (1 << bits) - 1
    out = torch.empty(2 * draws.numel(), dtype=torch.int32, device=device)
    torch.bitwise_and(draws, mask, out=out[: draws.numel()])
    torch.bitwise_right_shift(draws, 16, out=out[draws.numel() :]).bitwise_and_(mask)
    return out[:n].view(shape)


def round_to_fp16(
    x: torch.Tensor, generator: torch.Generator, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Stochastically round fp32 to fp16: unbiased, so small updates survive in expectation;
    values already in fp16 stay exactly.

    Round-to-nearest fp16 storage loses updates below half an ulp (weight decay first): after
    1500 SGD steps of a 512-class CosFace head the row norms were 0.86-0.89x fp32 storage's.
    In fp16's normal range its mantissa is fp32's top 10 bits, so random 13 low bits and a
    truncation round exactly as for bf16. Below it (|x| < 2^-14, fp16 subnormals, spacing
    6e-8) values round to nearest: an error of at most 3e-8 there, far below any update that
    matters. Temporaries are one row block (``_SR_BLOCK`` elements), whatever ``x``'s size.
    """
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float16, device=x.device) if out is None else out
    for r0, r1 in _row_blocks(x):
        xs = x[r0:r1]
        bits = xs.view(torch.int32)
        sr = _random_bits(xs.shape, 13, x.device, generator).add_(bits).bitwise_and_(-8192)
        # fp32 exponent field below 113 (|x| < 2^-14): keep x, rounded to nearest below.
        tiny = bits.bitwise_and(0x7F800000) < (113 << 23)
        out[r0:r1] = torch.where(tiny, bits, sr).view(torch.float32)
    return out


# Per-row optimizer states a bank may hold beside the weight (all sharded like it): SGD's
# momentum; AdamW's moments and per-row step counts.
ROW_STATES = ("momentum", "exp_avg", "exp_avg_sq", "steps")


class CenterBank:
    """Weight rows of a contiguous shard and their optimizer states, kept on one device.

    ``states`` holds the per-row optimizer tensors by name (``ROW_STATES``): row-shaped ones in
    ``momentum_dtype``, ``steps`` as one int32 per row. Half-precision storage (fp16, bf16) is
    written with stochastic rounding from a ``StepRng`` stream, whose state loads on any device.

    ``storage`` is where the tensors live and ``device`` where gathered rows go and updates
    come from; here both are the same device (``resident``: the head may read ``weight``
    itself). ``HostBank`` and ``DiskBank`` keep them apart behind the same methods.
    """

    resident = True

    def __init__(
        self,
        weight: torch.Tensor,
        momentum_dtype: torch.dtype | None = None,
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
        self.rounding = StepRng(seed)
        self._staging = Workspace(weight.device)  # reused fp16/bf16 row buffers

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

    def load(
        self, weight: torch.Tensor | FileRows, states: dict[str, torch.Tensor | FileRows | None]
    ) -> None:
        """Copy a saved shard in (shapes checked; the storage dtypes stay this bank's). Rows
        still in files (``FileRows``) are read a chunk at a time."""
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
        self.states = {}
        for name, value in states.items():
            if value is None:
                continue
            shape, _ = self._shape_dtype(name)
            if tuple(value.shape) != shape:
                raise ValueError(f"head {name} shape {tuple(value.shape)} != {shape}")
            self._load_rows(name, self.ensure_state(name), value)

    def _load_rows(self, name: str, target: torch.Tensor, value: torch.Tensor | FileRows) -> None:
        if isinstance(value, FileRows):
            value.read_into(target)
        else:
            target.copy_(value)

    def file_rows(self) -> dict[str, FileRows]:
        """The tensors that already are files (a disk bank's), so a save can copy files."""
        return {}

    def _gather(
        self, src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None
    ) -> torch.Tensor:
        if out is None:
            return src.index_select(0, rows).float()
        if src.dtype == out.dtype:
            return torch.index_select(src, 0, rows, out=out)
        # Through a staging block in the source dtype: its size is a block, not the gather's.
        per_row = out[0].numel() if out.dim() > 1 and out.shape[0] else 1
        step = max(1, _GATHER_BLOCK // max(per_row, 1))
        for r0 in range(0, out.shape[0], step):
            r1 = min(out.shape[0], r0 + step)
            staged = self._staging.get("gather", (r1 - r0, *out.shape[1:]), src.dtype)
            out[r0:r1].copy_(torch.index_select(src, 0, rows[r0:r1], out=staged))
        return out

    def gather(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy of the weight ``rows``: fp32, or ``out``'s dtype when given."""
        return self._gather(self.weight, rows, out)

    def gather_state(
        self, name: str, rows: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Copy of a row state's ``rows`` (fp32 or ``out``'s dtype; zeros while it is absent)."""
        if name not in self.states:
            shape, _ = self._shape_dtype(name)
            shape = (len(rows), *shape[1:])
            return torch.zeros(shape, device=self.device) if out is None else out.zero_()
        return self._gather(self.states[name], rows, out)

    def _store(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if dtype == x.dtype:
            return x
        if not dtype.is_floating_point:
            return x.to(dtype)
        gen = self.rounding.generator(x.device)
        out = self._staging.get("store", tuple(x.shape), dtype)
        rounding = round_to_bf16 if dtype == torch.bfloat16 else round_to_fp16
        return rounding(x, gen, out)

    def write_state(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write a row state's ``rows`` back in its dtype; every other row stays bit-identical."""
        state = self.ensure_state(name)
        self._write(state, rows, self._store(values, state.dtype))

    def apply_update(
        self, rows: torch.Tensor, new_rows: torch.Tensor, new_momentum: torch.Tensor | None
    ) -> None:
        """Write ``rows`` back in the storage dtypes; every other row stays bit-identical."""
        self._write(self.weight, rows, self._store(new_rows, self.weight.dtype))
        if new_momentum is not None:
            self.write_state("momentum", rows, new_momentum)

    def _write(self, target: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``values`` (already in ``target``'s dtype) at ``rows``."""
        target.index_copy_(0, rows, values)
