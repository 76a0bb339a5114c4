"""The compiled row-sparse SGD update: against the eager update and ``torch.optim.SGD``, its two
variants bit-identical to each other, masked and non-finite rows, and the fallback."""

from __future__ import annotations

import logging

import pytest
import torch

import pfc_ds
from pfc_ds.head import cpu_kernels, row_kernels
from pfc_ds.head.bank import DirectRows
from pfc_ds.head.rounding import step_key, stochastic_round

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None, reason="no C++ compiler: the eager update is the only one"
)

N, D, S = 300, 24, 90


def _case(seed: int = 0, per_row: bool = True, D: int = D):
    g = torch.Generator().manual_seed(seed)
    bank_w = torch.randn(N, D, generator=g) * 0.1
    bank_m = torch.randn(N, D, generator=g) * 0.01
    index = torch.randperm(N, generator=g)[:S]
    rows = bank_w[index].clone()
    grad = torch.randn(S, D, generator=g) * 100
    coef = torch.randn(S, generator=g) * 0.1
    on = torch.ones(S, 1) if per_row else torch.ones(())
    if per_row:
        on[::5] = 0.0
        grad[::5] = float("nan")  # masked rows: their gradient must not be read
    return bank_w, bank_m, index, rows, grad, coef, on


def _direct(bank_w, bank_m=None, keys=((0, 0), (0, 0)), row_offset=0):
    tensors = (bank_w,) if bank_m is None else (bank_w, bank_m)
    return DirectRows(tensors, keys, row_offset)


def _eager(bank_w, bank_m, index, rows, grad, coef, on, scale, lr, mom, wd):
    """The update in float64, row by row: the independent reference."""
    w, g, c = rows.double(), grad.double(), coef.double()
    keep = on.reshape(-1).expand(S) > 0
    g = torch.where(keep[:, None], g, 0.0) + w * (c[:, None] + wd * scale)
    out_w, out_m = bank_w.double().clone(), bank_m.double().clone()
    if mom:
        m = out_m[index] * mom + g / scale
        new_w = w - lr * m
        out_m[index] = torch.where(keep[:, None], m, out_m[index])
    else:
        new_w = w - lr * g / scale
    out_w[index] = torch.where(keep[:, None], new_w, out_w[index])
    return out_w, out_m


@pytest.mark.parametrize("mom", [0.9, 0.0])
@pytest.mark.parametrize("scale", [1.0, 1024.0, "tensor"])
@pytest.mark.parametrize("per_row", [True, False])
def test_scatter_matches_float64_and_the_block_kernel_bit_for_bit(mom, scale, per_row):
    bank_w, bank_m, index, rows, grad, coef, on = _case(per_row=per_row)
    s = torch.full((), 512.0) if scale == "tensor" else scale
    lr, wd = 0.1, 5e-4
    ref_w, ref_m = _eager(bank_w, bank_m, index, rows, grad, coef, on, float(s), lr, mom, wd)

    w1, m1 = bank_w.clone(), bank_m.clone()
    ok = row_kernels.sgd_scatter(_direct(w1, m1), index, rows, grad, coef, on, s, lr, mom, wd)
    assert ok.dtype == torch.bool and bool(ok)
    assert torch.allclose(w1.double(), ref_w, rtol=1e-6, atol=1e-7)
    if mom:
        assert torch.allclose(m1.double(), ref_m, rtol=1e-6, atol=1e-7)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[index[on.reshape(-1).expand(S) > 0]] = False
    assert torch.equal(w1[untouched], bank_w[untouched])  # masked and unsampled rows: same bits
    assert torch.equal(m1[untouched], bank_m[untouched])

    w2, m2 = rows.clone(), bank_m[index].clone()
    row_kernels.sgd_block_(w2, grad, m2 if mom else None, coef, on, s, lr, mom, wd)
    assert torch.equal(w2, w1[index])
    if mom:
        assert torch.equal(m2, m1[index])


@pytest.mark.parametrize("store", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mom_dtype", ["same", torch.float32])
@pytest.mark.parametrize("dim", [24, 21])
@pytest.mark.parametrize("f16c", [True, False])
def test_half_scatter_rounds_with_the_banks_own_bits(store, mom_dtype, dim, f16c):
    """Into fp16/bf16 storage the scatter equals the fp32 update followed by
    ``rounding.stochastic_round`` with the step's keys, bit for bit (rows with a global offset,
    so the rounding's row ids are the global ones), with F16C's conversions and without, on
    whole vectors of 8 and with a tail."""
    mom_dtype = store if mom_dtype == "same" else mom_dtype
    was = cpu_kernels.load().set_f16c(f16c)
    try:
        _half_scatter(store, mom_dtype, dim)
    finally:
        cpu_kernels.load().set_f16c(was)


def _half_scatter(store, mom_dtype, dim):
    bank_w, bank_m, index, rows, grad, coef, on = _case(seed=3, D=dim)
    for i, (col, value) in enumerate([(3, 3e-6), (0, -7e-8)], start=2):
        # New values in fp16's subnormal range: rounded to nearest after the random bits.
        bank_w[index[i], col], bank_m[index[i], col], grad[i, col] = value, 0.0, 0.0
    bank_w, bank_m = bank_w.to(store), bank_m.to(mom_dtype)
    rows = bank_w[index].float()
    keys, offset = (step_key(7, 5, 1), step_key(7, 5, 2)), 123_456
    lr, mom, wd = 0.1, 0.9, 5e-4

    w1, m1 = bank_w.clone(), bank_m.clone()
    ok = row_kernels.sgd_scatter(
        _direct(w1, m1, keys, offset), index, rows, grad, coef, on, 64.0, lr, mom, wd
    )
    assert bool(ok)

    w2, m2 = rows.clone(), bank_m[index].float()
    row_kernels.sgd_block_(w2, grad, m2, coef, on, 64.0, lr, mom, wd)
    applied = on.reshape(-1) > 0
    gid = index + offset
    want_w, want_m = bank_w.clone(), bank_m.clone()
    want_w[index] = stochastic_round(w2, gid, keys[0], torch.empty_like(bank_w[index]))
    if mom_dtype == torch.float32:
        want_m[index] = m2
    else:
        want_m[index] = stochastic_round(m2, gid, keys[1], torch.empty_like(bank_m[index]))
    # Skipped rows are not written at all (the block kernel left them as read: equal too).
    assert torch.equal(w1[index[applied]], want_w[index[applied]])
    assert torch.equal(m1[index[applied]], want_m[index[applied]])
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[index[applied]] = False
    assert torch.equal(w1[untouched], bank_w[untouched])
    assert torch.equal(m1[untouched], bank_m[untouched])


def test_half_overflow_is_flagged_before_rounding():
    """An fp16 bank flags a value past 65504, as ``CenterBank._note`` does."""
    bank_w, bank_m, index, rows, grad, coef, _ = _case()
    bank_w, bank_m = bank_w.half(), bank_m.half()
    rows = bank_w[index].float()
    grad[4, 2] = 1e9  # momentum 1e9, weight -1e8: finite in fp32, not in fp16
    on = torch.ones(S, 1)
    ok = row_kernels.sgd_scatter(
        _direct(bank_w, bank_m), index, rows, grad, coef, on, 1.0, 0.1, 0.9, 0.0
    )
    assert not bool(ok)


def test_a_nonfinite_result_is_flagged():
    bank_w, bank_m, index, rows, grad, coef, _ = _case()
    grad[3, 7] = float("inf")
    on = torch.ones(S, 1)
    ok = row_kernels.sgd_scatter(
        _direct(bank_w, bank_m), index, rows, grad, coef, on, 1.0, 0.1, 0.9, 0.0
    )
    assert not bool(ok)


def test_a_window_that_is_off_changes_nothing():
    bank_w, bank_m, index, rows, grad, coef, _ = _case()
    grad[:] = float("nan")
    w, m = bank_w.clone(), bank_m.clone()
    off = torch.zeros(())
    ok = row_kernels.sgd_scatter(_direct(w, m), index, rows, grad, coef, off, 1.0, 0.1, 0.9, 5e-4)
    assert bool(ok) and torch.equal(w, bank_w) and torch.equal(m, bank_m)


def test_wrong_layouts_raise_naming_the_tensor():
    bank_w, _, index, rows, grad, coef, on = _case()
    with pytest.raises(RuntimeError, match="grad must be a contiguous CPU float32"):
        row_kernels.sgd_block_(rows, grad.t().contiguous().t(), None, coef, on, 1.0, 0.1, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="index must be a contiguous CPU int64"):
        row_kernels.sgd_scatter(
            _direct(bank_w), index.int(), rows, grad, coef, on, 1.0, 0.1, 0.0, 0.0
        )


def _train(monkeypatch, compiled: bool, dtype=torch.float32, rate=0.3):
    """Five SGD steps at a loss scale; returns the weights, momenta and the kernels called."""
    calls = []
    monkeypatch.setattr(
        cpu_kernels, "usable", lambda *t: compiled and cpu_kernels.load() is not None
    )
    for name in ("sgd_scatter", "sgd_block_"):
        real = getattr(row_kernels, name)
        monkeypatch.setattr(
            row_kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )  # fmt: skip
    torch.manual_seed(0)
    head = pfc_ds.PartialFC(
        pfc_ds.CombinedMarginLoss(32.0, 1.0, 0.0, 0.3), 16, 400, sample_rate=rate, dtype=dtype,
        even_batches=True,
    )  # fmt: skip
    opt = pfc_ds.SparseSGD(head, 0.5, 0.9, 5e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        emb = torch.randn(24, 16, generator=g, requires_grad=True)
        head(emb, torch.randint(0, 400, (24,), generator=g)).backward()
        assert bool(opt.step(torch.full((), 256.0)))
        opt.zero_grad()
    return head.weight.float().clone(), head.momentum.float().clone(), set(calls)


@pytest.mark.parametrize(
    "rate,dtype,kernel",
    [
        (0.3, torch.float32, "sgd_scatter"),  # a device bank: written in the kernel's pass
        (1.0, torch.float32, "sgd_block_"),  # the whole shard, in place
        (0.3, torch.bfloat16, "sgd_scatter"),  # half storage: rounded in the same pass
    ],
)
def test_sparse_sgd_with_the_kernel_follows_the_eager_update(monkeypatch, rate, dtype, kernel):
    """The compiled and eager updates differ by rounding only (the eager ops contract some
    products into FMAs); each storage takes the kernel it should."""
    w1, m1, used = _train(monkeypatch, True, dtype, rate)
    w0, m0, none = _train(monkeypatch, False, dtype, rate)
    assert used == {kernel} and none == set()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: a rounding apart may flip a bit
    assert torch.allclose(w1, w0, rtol=tol, atol=1e-7)
    assert torch.allclose(m1, m0, rtol=tol, atol=1e-7)


def test_an_unbuildable_kernel_falls_back_with_one_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr("torch.utils.cpp_extension.load", broken)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    with caplog.at_level(logging.WARNING):
        assert cpu_kernels.load() is None
        assert cpu_kernels.load() is None
    warnings = [r for r in caplog.records if "CPU kernels are not available" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0].getMessage()
    assert not cpu_kernels.usable(torch.zeros(1))
    head = pfc_ds.PartialFC(pfc_ds.CombinedMarginLoss(32.0, 1.0, 0.0, 0.3), 8, 50)
    opt = pfc_ds.SparseSGD(head, 0.1, 0.9)
    before = head.weight.clone()
    head(torch.randn(6, 8, requires_grad=True), torch.randint(0, 50, (6,))).backward()
    assert bool(opt.step())
    assert not torch.equal(head.weight, before)


def test_eager_is_chosen_by_the_environment(monkeypatch):
    monkeypatch.setenv("PFC_DS_CPU_KERNELS", "eager")
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    assert cpu_kernels.load() is None
