"""fp16 / bf16 centre storage (fp32 update math) trains like fp32 storage."""

import pytest
import torch

import pfc_ds
from pfc_ds.head.bank import round_to_bf16

C, D, B, STEPS = 64, 32, 64, 200


def train(dtype, momentum_dtype=None):
    """A separable problem: fixed unit prototypes plus small noise; only the head learns."""
    g = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=1)
    margin = pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4)
    head = pfc_ds.PartialFC(
        margin, D, C, sample_rate=0.5, dtype=dtype, momentum_dtype=momentum_dtype, seed=1
    )
    opt = pfc_ds.SparseSGD(head, lr=0.02, momentum=0.9, weight_decay=5e-4)
    losses = []
    for _ in range(STEPS):
        labels = torch.randint(0, C, (B,), generator=g)
        emb = protos[labels] + 0.05 * torch.randn(B, D, generator=g)
        loss = head(emb, labels)
        loss.backward()
        assert opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert head.weight.dtype == dtype
    return sum(losses[-20:]) / 20, losses[0]


@pytest.fixture(scope="module")
def fp32_loss():
    final, first = train(torch.float32)
    assert final < first / 20  # it learns
    return final


@pytest.mark.parametrize(
    ("dtype", "momentum_dtype"),
    [
        (torch.float16, None),
        (torch.float16, torch.float32),
        (torch.bfloat16, None),
        (torch.bfloat16, torch.float32),
    ],
)
def test_low_precision_storage_within_2_percent(fp32_loss, dtype, momentum_dtype):
    final, _ = train(dtype, momentum_dtype)
    assert abs(final - fp32_loss) / fp32_loss < 0.02, (final, fp32_loss)


def test_bf16_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 1e-3)  # between bf16 neighbours 1.0 and 1.0078125
    g = torch.Generator().manual_seed(0)
    rounded = round_to_bf16(x, g).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0078125}
    assert abs(rounded.mean().item() - (1.0 + 1e-3)) < 2e-5
    assert x.to(torch.bfloat16).float().mean().item() == 1.0  # nearest rounding loses it
    exact = torch.tensor([0.5, -2.0, 3.0])
    assert torch.equal(round_to_bf16(exact, g).float(), exact)


def test_fp16_stochastic_rounding_is_unbiased_and_keeps_exact_values():
    from pfc_ds.head.bank import round_to_fp16

    g = torch.Generator().manual_seed(0)
    x = torch.full((4000, 50), 1.0 + 2e-4)  # between fp16 neighbours 1.0 and 1.0009765625
    rounded = round_to_fp16(x, g).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0009765625}
    assert abs(rounded.mean().item() - (1.0 + 2e-4)) < 5e-6
    neg = round_to_fp16(-x, g).float()
    assert abs(neg.mean().item() + (1.0 + 2e-4)) < 5e-6
    exact = torch.tensor([[0.0, -0.5, 3.0, 65504.0, 2.0**-14, 1e-7]])  # 1e-7: fp16 subnormal
    kept = round_to_fp16(exact.half().float(), g)
    assert torch.equal(kept, exact.half())


def _row_norms_after(dtype, steps=1500, classes=512, dim=32, batch=64):
    """The drift problem: CosFace, lr 0.1, momentum 0.9, wd 5e-4, r = 1. Half the classes
    are never positive, so only weight decay (and the negatives' push) moves them."""
    g = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    margin = pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4)
    head = pfc_ds.PartialFC(margin, dim, classes, sample_rate=1.0, dtype=dtype, seed=1)
    opt = pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    positive = classes // 2
    for _ in range(steps):
        labels = torch.randint(0, positive, (batch,), generator=g)
        emb = protos[labels] + 0.05 * torch.randn(batch, dim, generator=g)
        head(emb, labels).backward()
        opt.step()
        opt.zero_grad()
    norms = head.weight.float().norm(dim=1)
    return norms[:positive].mean().item(), norms[positive:].mean().item()


@pytest.mark.slow
def test_half_storage_row_norms_track_fp32_over_1500_steps():
    want_pos, want_never = _row_norms_after(torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        pos, never = _row_norms_after(dtype)
        assert abs(pos / want_pos - 1) < 0.03, (dtype, pos, want_pos)
        assert abs(never / want_never - 1) < 0.03, (dtype, never, want_never)
