"""Storage of one rank's class centres and their momentum.

The head and the optimizer touch the shard only through ``gather`` and ``apply_update``, so a
host-memory or disk-backed bank can replace this device-tensor bank without changing them.
"""

from __future__ import annotations

import torch

from pfc_ds.head import seeds
from pfc_ds.head.workspace import Workspace

# Centres are drawn in fixed blocks of global rows, each from its own seeded generator, so the
# same seed gives the same centre for a class at any world size at the cost of at most two
# partly-used blocks per rank.
_INIT_BLOCK = 8192
_INIT_STD = 0.01
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def init_centres(
    seed: int, class_start: int, num_local: int, embedding_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """N(0, 0.01) rows ``class_start .. class_start + num_local``, independent of the sharding."""
    out = torch.empty(num_local, embedding_size, dtype=dtype)
    end = class_start + num_local
    for block in range(
        class_start // _INIT_BLOCK, (end - 1) // _INIT_BLOCK + 1 if num_local else 0
    ):
        lo = block * _INIT_BLOCK
        gen = torch.Generator().manual_seed(seeds.centre_block(seed, block))
        rows = torch.randn(_INIT_BLOCK, embedding_size, generator=gen).mul_(_INIT_STD)
        a, b = max(lo, class_start), min(lo + _INIT_BLOCK, end)
        out[a - class_start : b - class_start] = rows[a - lo : b - lo]
    return out


def round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Stochastically round fp32 to bf16: unbiased, so small updates survive in expectation.

    bf16 keeps 8 mantissa bits; round-to-nearest drops any update below 2^-9 of the weight,
    which stalls training (measured on the problem of tests/test_head_precision.py: 32% higher
    final loss than fp32 storage with nearest rounding, 0.14% with this).
    bf16 is the high half of fp32, so adding 16 random low bits and truncating is exact SR.
    """
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator
    )
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class CenterBank:
    """Weight and momentum rows of a contiguous shard, kept on one device."""

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
        self.momentum: torch.Tensor | None = None  # allocated by the first update
        self.momentum_dtype = momentum_dtype
        self.rounding = torch.Generator(device=weight.device).manual_seed(seed)
        self._staging = Workspace(weight.device)  # reused fp16/bf16 row buffers

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def _gather(
        self, src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None
    ) -> torch.Tensor:
        if out is None:
            return src.index_select(0, rows).float()
        if src.dtype == torch.float32:
            return torch.index_select(src, 0, rows, out=out)
        staged = self._staging.get("gather", tuple(out.shape), src.dtype)
        return out.copy_(torch.index_select(src, 0, rows, out=staged))

    def gather(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 copy of the weight ``rows`` (into ``out`` when given)."""
        return self._gather(self.weight, rows, out)

    def gather_momentum(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 copy of the momentum ``rows`` (zeros before the first update)."""
        if self.momentum is None:
            shape = (len(rows), self.weight.shape[1])
            return torch.zeros(shape, device=self.device) if out is None else out.zero_()
        return self._gather(self.momentum, rows, out)

    def _store(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.bfloat16:
            return round_to_bf16(x, self.rounding)
        if dtype == x.dtype:
            return x
        return self._staging.get("store", tuple(x.shape), dtype).copy_(x)

    def apply_update(
        self, rows: torch.Tensor, new_rows: torch.Tensor, new_momentum: torch.Tensor | None
    ) -> None:
        """Write ``rows`` back in the storage dtypes; every other row stays bit-identical."""
        self.weight.index_copy_(0, rows, self._store(new_rows, self.weight.dtype))
        if new_momentum is not None:
            if self.momentum is None:
                self.momentum = torch.zeros(
                    self.weight.shape, dtype=self.momentum_dtype, device=self.device
                )
            self.momentum.index_copy_(0, rows, self._store(new_momentum, self.momentum_dtype))
