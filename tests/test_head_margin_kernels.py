"""The margin softmax's compiled CPU passes (csrc/margin_softmax.cpp): against the eager ops
(which a GPU runs) and a float64 reference, AVX2 against portable code bit for bit, and the
backward's bound that lets the window's finite check skip the S x D sum."""

from __future__ import annotations

import math

import pytest
import torch

import pfc_ds
from pfc_ds.head import cpu_kernels, partial_fc
from tests import reference as ref

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None, reason="no C++ compiler: the eager ops are the only ones"
)

NO_MASK = torch.empty(0, dtype=torch.bool)


def _inputs(n=24, cols=1003, seed=0, active=False, raw=False):
    g = torch.Generator().manual_seed(seed)
    dots = torch.randn(n, cols, generator=g) * 0.3
    inv = torch.rand(cols, generator=g) + 0.5
    target = torch.randint(-200, cols + 200, (n,), generator=g)  # some outside the chunk
    t_logit = torch.randn(n, generator=g) * 5
    act = torch.rand(cols, generator=g) < 0.8 if active else NO_MASK
    dots[0, :40] = 3.0  # clamp bounds and filter thresholds bite
    dots[1, :40] = -3.0
    return dots, inv, target, act, t_logit


def _eager_forward(dots, inv, target, act, t_logit, s, bound, thr):
    cos = (dots * inv).clamp(-bound, bound)
    logits = cos * s
    cols = torch.arange(cos.shape[1])
    is_t = cols[None, :] == target[:, None]
    if thr > 0:
        logits = torch.where((cos > thr) & ~is_t, 0.0, logits)
    logits = torch.where(is_t, t_logit[:, None], logits)
    if act.numel():
        logits = logits.masked_fill(~act, float("-inf"))
    top = logits.max(dim=1).values
    return cos, top, torch.exp(logits - top[:, None]).sum(dim=1)


def _forward(dots, inv, target, act, t_logit, s, bound, thr, c0=0):
    block = dots.clone()
    n = block.shape[0]
    run_max, run_sum = torch.full((n,), -1e30), torch.zeros(n)
    cpu_kernels.load().margin_forward(
        block, inv, target + c0, c0, act, t_logit, run_max, run_sum, s, bound, thr
    )
    return block, run_max, run_sum


@pytest.mark.parametrize("thr", [0.0, 0.2])
@pytest.mark.parametrize("bound", [1.0, 0.5])
@pytest.mark.parametrize("active", [False, True])
def test_forward_matches_the_eager_ops(thr, bound, active):
    dots, inv, target, act, t_logit = _inputs(active=active)
    s = 64.0
    cos, run_max, run_sum = _forward(dots, inv, target, act, t_logit, s, bound, thr, c0=7)
    cos_e, top_e, sum_e = _eager_forward(dots, inv, target, act, t_logit, s, bound, thr)
    assert torch.equal(cos, cos_e)  # the same fp32 products and clamp
    assert torch.equal(run_max, top_e)
    assert torch.allclose(run_sum, sum_e, rtol=2e-6)


def _backward(cos, inv, target, act, t_logit, lse, dm, s, bound, thr, raw, coef=None):
    out = torch.empty_like(cos)
    acc = coef is not None
    coef = torch.zeros(cos.shape[1]) if coef is None else coef.clone()
    amax = cpu_kernels.load().margin_backward(
        cos, out, raw, inv, torch.tensor(0.25), target, 0, act, t_logit, lse, dm, s, bound, thr,
        coef, acc,
    )  # fmt: skip
    return out, coef, amax


@pytest.mark.parametrize("thr", [0.0, 0.2])
@pytest.mark.parametrize("bound", [1.0, 0.5])
@pytest.mark.parametrize("active", [False, True])
@pytest.mark.parametrize("raw", [False, True])
def test_backward_matches_float64(thr, bound, active, raw):
    dots, inv, target, act, t_logit = _inputs(seed=1, active=active)
    s = 32.0
    cos, top, sums = _eager_forward(dots, inv, target, act, t_logit, s, bound, thr)
    lse = (torch.log(sums) + top).contiguous()
    dm = torch.rand(dots.shape[0]) + 0.5
    g, coef, amax = _backward(dots if raw else cos, inv, target, act, t_logit, lse, dm, s,
                              bound, thr, raw)  # fmt: skip
    # float64: softmax - onehot on the target (times the margin's derivative), filtered and
    # clamped non-targets and inactive columns none, times r * step.
    c = cos.double()
    cols = torch.arange(c.shape[1])
    is_t = cols[None, :] == target[:, None]
    dirty = (c > thr) & ~is_t if thr > 0 else torch.zeros_like(is_t)
    logits = torch.where(dirty, 0.0, c * s)
    logits = torch.where(is_t, t_logit.double()[:, None], logits)
    p = torch.exp(logits - lse.double()[:, None])
    if act.numel():
        p = p * act
    p = torch.where(is_t, (p - 1) * dm.double()[:, None], p)
    p = torch.where(dirty, 0.0, p)
    if bound < 1:
        p = torch.where((c.abs() >= bound) & ~is_t, 0.0, p)
    want = p * (inv.double() * 0.25)
    assert ref.rel_err(g, want) < 1e-6
    assert ref.rel_err(coef, -(c * want).sum(dim=0) * inv.double()) < 1e-5
    assert float(amax) == float(g.abs().max())
    # Accumulating adds this backward's coefficients to what was there.
    _, coef2, _ = _backward(dots if raw else cos, inv, target, act, t_logit, lse, dm, s, bound,
                            thr, raw, coef=coef)  # fmt: skip
    assert torch.allclose(coef2, 2 * coef, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("cols", [8, 1003, 2048 + 5])
def test_avx2_and_portable_loops_give_the_same_bits(cols):
    k = cpu_kernels.load()
    dots, inv, target, act, t_logit = _inputs(cols=cols, seed=2, active=True)
    lse = torch.full((dots.shape[0],), 40.0)
    dm = torch.rand(dots.shape[0]) + 0.5
    results = []
    for avx2 in (True, False):
        was = k.set_avx2(avx2)
        try:
            fwd = _forward(dots, inv, target, act, t_logit, 64.0, 0.9, 0.2)
            bwd = _backward(dots, inv, target, act, t_logit, lse, dm, 64.0, 0.9, 0.2, True)
            results.append([*fwd, *bwd])
        finally:
            k.set_avx2(was)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_non_finite_inputs_propagate():
    dots, inv, target, act, t_logit = _inputs(seed=3)
    dots[5, 17] = float("nan")
    _, run_max, run_sum = _forward(dots, inv, target, act, t_logit, 64.0, 1.0, 0.0)
    assert math.isnan(run_max[5]) and math.isnan(run_sum[5])
    assert torch.isfinite(run_max[:5]).all() and torch.isfinite(run_sum[:5]).all()
    lse = torch.full((dots.shape[0],), 40.0)
    _, _, amax = _backward(dots, inv, target, act, t_logit, lse, torch.ones(24), 64.0, 1.0,
                           0.0, True)  # fmt: skip
    assert math.isinf(float(amax))


def test_exp_is_close_to_libm_and_zero_far_below():
    # Through the forward: one column, target elsewhere, so run_sum = exp(logit - top) with
    # top = max(-1e30, logit) = logit ... use two columns to put exp's argument where we want.
    x = torch.linspace(-86.9, 0.0, 4001)
    n = x.shape[0]
    dots = torch.stack([torch.zeros(n), x / 64.0], dim=1).contiguous()  # logit 0 and x
    inv = torch.ones(2)
    target = torch.full((n,), -1)
    _, run_max, run_sum = _forward(dots, inv, target, NO_MASK, torch.zeros(n), 64.0, 2.0, 0.0)
    assert torch.equal(run_max, torch.zeros(n))
    want = 1.0 + torch.exp((dots[:, 1] * 64.0).double())
    assert ((run_sum.double() - want).abs() / want).max() < 3e-7
    far = torch.tensor([[0.0, -88.0 / 64.0], [0.0, -1e4]])
    _, _, s = _forward(far, inv, torch.full((2,), -1), NO_MASK, torch.zeros(2), 64.0, 1e6, 0.0)
    assert torch.equal(s, torch.ones(2))


def _head(**kw):
    margin = pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    return pfc_ds.PartialFC(margin, 16, 300, sample_rate=0.5, even_batches=True, **kw)


@pytest.mark.usefixtures("head_ops")
def test_the_finite_check_reads_the_bound_not_the_rows(monkeypatch):
    """After backward the check sums the S coefficients only; a gradient changed since (its
    version moved) is summed whole; NaN embeddings read as not finite."""
    head = _head()
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(32, 16, generator=g, requires_grad=True)
    head(emb, torch.randint(0, 300, (32,), generator=g)).backward()
    w = head.window
    assert w.bound is not None and w.bound_at == (w.grad._version, w.coef._version)
    assert float(w.bound) >= float(w.grad.abs().max())  # it is a bound
    sums = []
    real = torch.Tensor.sum
    monkeypatch.setattr(
        torch.Tensor, "sum", lambda t, *a, **k: sums.append(t.numel()) or real(t, *a, **k)
    )
    assert bool(head.grads_finite())
    assert sums == [w.coef.numel()]
    monkeypatch.setattr(torch.Tensor, "sum", real)
    w.grad[3, 2] = float("inf")  # moves the version: the whole gradient is summed
    assert not bool(head.grads_finite())

    head2 = _head()
    bad = torch.randn(32, 16, generator=g)
    bad[4, 1] = float("nan")
    head2(bad.requires_grad_(), torch.randint(0, 300, (32,), generator=g)).backward()
    assert not bool(head2.grads_finite())


@pytest.mark.usefixtures("head_ops")
def test_accumulated_windows_add_their_bounds():
    head = _head()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 16, generator=g, requires_grad=True),
                torch.randint(0, 300, (16,), generator=g)) for _ in range(2)]  # fmt: skip
    head.prefetch([labels for _, labels in batches])
    bounds = []
    for emb, labels in batches:
        head(emb, labels).backward()
        bounds.append(float(head.window.bound))
    assert bounds[1] > bounds[0] > 0
    assert bounds[1] >= float(head.window.grad.abs().max())
    assert bool(head.grads_finite())
    assert partial_fc.GRAD_BOUND == 2.0**126
