"""fp16 / bf16 centre storage (fp32 update math) trains like fp32 storage."""

import pytest
import torch

import pfc_ds

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
        assert abs(pos / want_pos - 1) < 0.01, (dtype, pos, want_pos)
        assert abs(never / want_never - 1) < 0.01, (dtype, never, want_never)


@pytest.mark.parametrize("batch", [128, 512])
@pytest.mark.parametrize("margin", ["cosface", "arcface"])
def test_fp16_gemms_stay_finite_at_the_shipped_loss_scale(batch, margin):
    """DeepSpeed's initial loss scale 2^16 times s/N times 1/|w| (~4.4 at init) overflowed the
    fp16 operand of the backward GEMMs at batch 128. The operand is scaled to at most 2^14 now,
    and the GEMMs return fp32: gradients are finite and match fp32 GEMMs."""
    m = (64.0, 1.0, 0.0, 0.4) if margin == "cosface" else (64.0, 1.0, 0.5, 0.0)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(batch, 512, generator=g)
    labels = torch.randint(0, 20_000, (batch,), generator=g)
    out = {}
    for gemm in (None, torch.float16):
        head = pfc_ds.PartialFC(
            pfc_ds.CombinedMarginLoss(*m), 512, 20_000, sample_rate=0.1,
            dtype=torch.float16, gemm_dtype=gemm, even_batches=True,
        )  # fmt: skip
        opt = pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
        e = emb.clone().requires_grad_(True)
        (head(e, labels) * 2.0**16).backward()
        grad_rows = head.window.row_grad()
        assert bool(opt.step(grad_scale=2.0**16))
        out[gemm] = (e.grad / 2.0**16, grad_rows / 2.0**16, head.weight.float())
    (ge, gr, w), (he, hr, v) = out[None], out[torch.float16]
    assert torch.isfinite(he).all() and torch.isfinite(hr).all()
    assert ((he - ge).norm() / ge.norm()).item() < 5e-3
    assert ((hr - gr).norm() / gr.norm()).item() < 5e-3
    assert ((v - w).norm() / w.norm()).item() < 1e-3
