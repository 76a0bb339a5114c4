"""Stochastic rounding with counter-based bits: unbiased, a pure function of (seed, step,
tensor, global row, column), so duplicate rows, any block split, row order or world size, and
CPU or CUDA round the same."""

from __future__ import annotations

import math

import pytest
import torch

from pfc_ds.head import rounding
from pfc_ds.head.rounding import column_keys, random_bits, row_keys, step_key, stochastic_round

M32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def _bits_reference(row: int, col: int, key: tuple[int, int], nbits: int) -> int:
    """The bits of one element in Python integers: the arithmetic the tensors must reproduce
    exactly (int32 products wrap modulo 2^32; every other op is exact)."""
    rk = _fmix32(_fmix32((row & M32) ^ key[0]) ^ ((row >> 32) & M32) ^ key[1])
    ck = _fmix32(col ^ 0x3C6EF372)
    x = ((rk ^ ck) * 0x9E3779B1) & M32
    return x >> (32 - nbits)


def test_tensor_bits_equal_the_integer_reference():
    """The device ops compute the exact integer hash: what makes CPU and CUDA agree."""
    key = step_key(seed=7, step=123, stream=rounding.STREAMS["momentum"])
    rows = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 + 5, 10_000_019])
    cols = column_keys(37, torch.device("cpu"))
    for nbits in (13, 16):
        got = random_bits(row_keys(rows, key), cols, nbits, torch.empty(6, 37, dtype=torch.int32))
        want = [[_bits_reference(int(r), c, key, nbits) for c in range(37)] for r in rows]
        assert got.tolist() == want


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_is_unbiased(dtype):
    lo, hi = (1.0, 1.0009765625) if dtype == torch.float16 else (1.0, 1.0078125)
    frac = 0.3
    value = lo + frac * (hi - lo)
    x = torch.full((4000, 50), value)
    means = []
    for step in range(3):
        out = torch.empty(x.shape, dtype=dtype)
        stochastic_round(x, torch.arange(4000) + 17, step_key(0, step, 1), out)
        got = out.float()
        assert set(got.unique().tolist()) == {lo, hi}
        means.append(got.mean().item())
        # 200k Bernoulli(0.3) draws: sd of the mean (hi - lo) * 0.001; allow 5 sd.
        assert abs(means[-1] - value) < 5 * (hi - lo) * math.sqrt(frac * (1 - frac) / x.numel())
        neg = torch.empty(x.shape, dtype=dtype)
        stochastic_round(-x, torch.arange(4000) + 17, step_key(0, step, 1), neg)
        assert torch.equal(neg.float(), -got)  # symmetric: magnitudes round alike
    assert len(set(means)) == 3  # each step draws other bits
    assert x.to(dtype).float().mean().item() == lo  # nearest rounding loses the update


def test_bits_are_uniform_and_steps_uncorrelated():
    key0, key1 = step_key(3, 0, 1), step_key(3, 1, 1)
    rows = torch.arange(2000)
    cols = column_keys(64, torch.device("cpu"))
    a = random_bits(row_keys(rows, key0), cols, 13, torch.empty(2000, 64, dtype=torch.int32))
    b = random_bits(row_keys(rows, key1), cols, 13, torch.empty(2000, 64, dtype=torch.int32))
    # 128000 values in 64 buckets: chi-square with 63 dof (sd ~11.2); 6 sd either side.
    counts = torch.bincount(a.flatten() // 128, minlength=64).double()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert 63 - 6 * 11.2 < chi2 < 63 + 6 * 11.2, chi2
    corr = torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1]
    assert abs(float(corr)) < 0.02
    # Neighbouring columns of a row are not copies of each other either.
    near = torch.corrcoef(torch.stack([a[:, :-1].flatten().double(), a[:, 1:].flatten().double()]))
    assert abs(float(near[0, 1])) < 0.02


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bits_depend_on_the_row_not_its_position(dtype, monkeypatch):
    """Duplicate rows round identically, and a permuted or re-blocked batch of rows rounds
    each row as before: the bits are a function of the global row and column."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g) * 0.1
    rows = torch.randint(0, 100, (300,), generator=g)  # many duplicates
    x[rows == 5] = x[(rows == 5).nonzero()[0]]  # equal values on one duplicated row
    key = step_key(11, 4, 2)
    once = stochastic_round(x, rows, key, torch.empty(300, 24, dtype=dtype))
    dup = once[rows == 5]
    assert torch.equal(dup, dup[:1].expand_as(dup))
    perm = torch.randperm(300, generator=g)
    monkeypatch.setattr(rounding, "CPU_BLOCK", 7 * 24)  # 7 rows a pass
    again = stochastic_round(x[perm], rows[perm], key, torch.empty(300, 24, dtype=dtype))
    assert torch.equal(again, once[perm])


def test_exact_values_stay_and_tiny_values_round_to_nearest_grid():
    exact = torch.tensor([[0.0, -0.5, 3.0, 65504.0, 2.0**-14, 2.0**-24]])
    for dtype in (torch.float16, torch.bfloat16):
        want = exact.to(dtype)
        got = stochastic_round(
            want.float(), torch.tensor([9]), step_key(1, 1, 1), torch.empty_like(want)
        )
        assert torch.equal(got, want)
    tiny = torch.full((1, 1000), 3.3e-8)  # between fp16 subnormals 2^-25 * {1, 2}
    got = stochastic_round(
        tiny, torch.tensor([4]), step_key(1, 2, 1), torch.empty(1, 1000, dtype=torch.float16)
    )
    assert set(got.float().unique().tolist()) <= {0.0, 2.0**-24, 2.0**-23}
