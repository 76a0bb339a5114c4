"""SparseAdamW against torch.optim.AdamW on the rows sampled at every step, and lazily elsewhere."""

import pytest
import torch

import pfc_ds

C, D, B = 400, 16, 32
LR, BETAS, EPS, WD = 0.01, (0.9, 0.999), 1e-8, 0.05


def _head(rate, **kw):
    margin = pfc_ds.CombinedMarginLoss(32.0, 1.0, 0.3, 0.0)
    return pfc_ds.PartialFC(margin, D, C, sample_rate=rate, seed=2, **kw)


def _batches(steps, fixed_labels=None):
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        labels = (
            fixed_labels if fixed_labels is not None else torch.randint(0, C, (B,), generator=g)
        )
        yield torch.randn(B, D, generator=g), labels


@pytest.mark.parametrize("rate", [1.0, 0.2])
def test_rows_sampled_every_step_follow_torch_adamw(rate):
    """With the same labels every step, the positives are sampled at every step: their rows must
    follow torch.optim.AdamW fed the same row gradients (at r = 1, every row)."""
    labels = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(1))
    head = _head(rate)
    opt = pfc_ds.SparseAdamW(head, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    rows = torch.arange(C) if rate == 1.0 else labels.unique()
    ref = torch.nn.Parameter(head.weight[rows].clone())
    ref_opt = torch.optim.AdamW([ref], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for emb, lab in _batches(6, labels):
        head(emb, lab).backward()
        p = head.window
        ref.grad = p.row_grad()[torch.searchsorted(p.index, rows)]
        assert bool(opt.step())
        ref_opt.step()
    torch.testing.assert_close(head.weight[rows], ref.detach(), rtol=1e-5, atol=1e-6)
    state = head.state_dict()
    assert torch.equal(state["steps"][rows], torch.full((len(rows),), 6, dtype=torch.int32))
    torch.testing.assert_close(state["exp_avg"][rows], ref_opt.state[ref]["exp_avg"])
    torch.testing.assert_close(state["exp_avg_sq"][rows], ref_opt.state[ref]["exp_avg_sq"])


def test_unsampled_rows_and_their_moments_stay_bit_identical():
    head = _head(0.1)
    opt = pfc_ds.SparseAdamW(head, lr=LR, weight_decay=WD)
    before = {k: v.clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}
    emb, labels = next(_batches(1))
    head(emb, labels).backward()
    index = head.window.index
    opt.step()
    untouched = torch.ones(C, dtype=torch.bool)
    untouched[index] = False
    after = head.state_dict()
    for key in ("weight", "exp_avg", "exp_avg_sq", "steps"):
        assert torch.equal(after[key][untouched], before[key][untouched]), key
    assert bool((after["steps"][index] == 1).all())


def test_nonfinite_gradient_changes_nothing():
    head = _head(0.5)
    opt = pfc_ds.SparseAdamW(head, lr=LR, weight_decay=WD)
    emb, labels = next(_batches(1))
    head(emb, labels).backward()
    opt.step()
    before = {k: v.clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}
    head(emb, labels).backward()
    head.window.grad[0, 0] = float("nan")
    assert not bool(opt.step())
    after = head.state_dict()
    for key in ("weight", "exp_avg", "exp_avg_sq", "steps"):
        assert torch.equal(after[key], before[key]), key


def test_adamw_state_reshards_exactly():
    from pfc_ds.head.reshard import consolidate, reshard

    head = _head(0.3)
    opt = pfc_ds.SparseAdamW(head, lr=LR, weight_decay=WD)
    for emb, labels in _batches(3):
        head(emb, labels).backward()
        opt.step()
    shard = {
        k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in head.state_dict().items()
    }
    three = reshard([shard], 3)
    back = consolidate(three)
    for key in ("weight", "exp_avg", "exp_avg_sq", "steps"):
        assert torch.equal(back[key], shard[key]), key
    assert three[1]["steps"].dtype == torch.int32
