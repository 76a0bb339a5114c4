"""W = 1 head against the float64 full-softmax reference and torch.optim.SGD."""

import math

import pytest
import torch

import pfc_ds
from tests import reference as ref

pytestmark = pytest.mark.usefixtures("head_ops")  # compiled kernels and eager ops

C, D, B = 64, 16, 24
TOL = 1e-5
MARGINS = {"arcface": (64.0, 0.5, 0.0), "cosface": (64.0, 0.0, 0.4), "combined": (32.0, 0.3, 0.2)}


def make_batches(n, seed=0, batch=B, classes=C):
    # Offset so no embedding repeats a centre's N(0, 1) draw (cos = 1 hits the arccos clamp).
    g = torch.Generator().manual_seed(10_000 + seed)
    return [
        (torch.randn(batch, D, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("chunk", [None, 5, 1])  # one block; 13 blocks; one column at a time
@pytest.mark.parametrize("name", list(MARGINS))
def test_loss_and_gradients_match_reference(name, chunk):
    s, m2, m3 = MARGINS[name]
    margin = pfc_ds.CombinedMarginLoss(s, 1.0, m2, m3)
    head = pfc_ds.PartialFC(margin, D, C, sample_rate=1.0, chunk=chunk)
    w0 = head.weight.clone()
    (emb, labels) = make_batches(1)[0]
    emb.requires_grad_(True)
    loss = head(emb, labels)
    loss.backward()
    ref_loss, ref_demb, ref_dw = ref.loss_and_grads(emb, w0, labels, s, m2, m3)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < TOL
    assert ref.rel_err(emb.grad, ref_demb) < TOL
    pending = head.window
    assert torch.equal(pending.index, torch.arange(C))
    assert ref.rel_err(pending.row_grad(), ref_dw) < TOL


@pytest.mark.parametrize(
    "options", [{"filter_threshold": 0.2}, {"straight_through": True}], ids=["filter", "st"]
)
def test_filtering_and_straight_through_match_reference(options):
    margin = pfc_ds.CombinedMarginLoss(
        64.0,
        1.0,
        0.5,
        0.0,
        interclass_filtering_threshold=options.get("filter_threshold", 0.0),
        straight_through=options.get("straight_through", False),
    )
    head = pfc_ds.PartialFC(margin, D, C)
    w0 = head.weight.clone()
    emb, labels = make_batches(1, seed=3)[0]
    emb.requires_grad_(True)
    loss = head(emb, labels)
    loss.backward()
    ref_loss, ref_demb, ref_dw = ref.loss_and_grads(emb, w0, labels, 64.0, 0.5, 0.0, **options)
    plain, _, _ = ref.loss_and_grads(emb, w0, labels, 64.0, 0.5, 0.0)
    if "filter_threshold" in options:
        assert abs(plain.item() - ref_loss.item()) > 1e-3  # the filter does bite on this batch
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < TOL
    assert ref.rel_err(emb.grad, ref_demb) < TOL
    assert ref.rel_err(head.window.row_grad(), ref_dw) < TOL


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_sparse_sgd_matches_torch_sgd(name):
    s, m2, m3 = MARGINS[name]
    lr, mom, wd = 0.05, 0.9, 5e-4
    head = pfc_ds.PartialFC(pfc_ds.CombinedMarginLoss(s, 1.0, m2, m3), D, C, sample_rate=1.0)
    opt = pfc_ds.SparseSGD(head, lr=lr, momentum=mom, weight_decay=wd)
    batches = make_batches(3, seed=1)
    ref_losses, ref_w, ref_buf = ref.sgd_steps(head.weight, batches, s, m2, m3, lr, mom, wd)
    losses = []
    for emb, labels in batches:
        loss = head(emb, labels)
        loss.backward()
        assert opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert ref.rel_err(torch.tensor(losses), torch.tensor(ref_losses)) < TOL
    assert ref.rel_err(head.weight, ref_w) < TOL
    assert ref.rel_err(head.momentum, ref_buf) < TOL


@pytest.mark.parametrize("gemm", [torch.bfloat16, torch.float16])
def test_half_gemms_stay_close_to_the_reference(gemm):
    """All three GEMMs (logits, dL/demb, dL/drows) take half inputs with fp32 accumulation."""
    s, m2, m3 = MARGINS["arcface"]
    margin = pfc_ds.CombinedMarginLoss(s, 1.0, m2, m3)
    head = pfc_ds.PartialFC(margin, D, C, sample_rate=1.0, gemm_dtype=gemm, chunk=7)
    w0 = head.weight.clone()
    emb, labels = make_batches(1)[0]
    emb.requires_grad_(True)
    loss = head(emb, labels)
    loss.backward()
    ref_loss, ref_demb, ref_dw = ref.loss_and_grads(emb, w0, labels, s, m2, m3)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-2
    assert ref.rel_err(emb.grad, ref_demb) < 5e-2
    assert ref.rel_err(head.window.row_grad(), ref_dw) < 5e-2


def test_uneven_last_batch_and_single_sample():
    head = pfc_ds.PartialFC(pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4), D, C)
    for n in (1, 7):
        emb, labels = make_batches(1, seed=n, batch=n)[0]
        ref_loss, _, _ = ref.loss_and_grads(emb, head.weight, labels, 64.0, 0.0, 0.4)
        assert abs(head(emb, labels).item() - ref_loss.item()) / ref_loss.item() < TOL


def test_storage_and_gemm_dtypes_follow_request():
    margin = pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4)
    head = pfc_ds.PartialFC(
        margin, D, C, dtype=torch.bfloat16, momentum_dtype=torch.float32, gemm_dtype=torch.bfloat16
    )
    assert head.weight.dtype == torch.bfloat16 and head.momentum is None
    opt = pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9)
    emb, labels = make_batches(1)[0]
    ref_loss, _, _ = ref.loss_and_grads(emb, head.weight.float(), labels, 64.0, 0.0, 0.4)
    loss = head(emb, labels)
    # bf16 GEMM: about 3 significant digits on the cosines, times s = 64.
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 2e-2
    loss.backward()
    opt.step()
    assert head.weight.dtype == torch.bfloat16 and head.momentum.dtype == torch.float32


def test_init_is_n001_and_seeded():
    margin = pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4)
    a = pfc_ds.PartialFC(margin, 128, 20000, seed=3).weight
    b = pfc_ds.PartialFC(margin, 128, 20000, seed=3).weight
    c = pfc_ds.PartialFC(margin, 128, 20000, seed=4).weight
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.mean().item()) < 1e-4 and abs(a.std().item() - 0.01) < 1e-4


def test_lr_is_settable_for_schedulers():
    head = pfc_ds.PartialFC(pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4), D, C)
    opt = pfc_ds.SparseSGD(head, lr=0.1, momentum=0.0)
    w0 = head.weight.clone()
    emb, labels = make_batches(1)[0]
    head(emb, labels).backward()
    grad = head.window.row_grad()
    opt.param_groups[0]["lr"] = 0.25
    opt.step()
    torch.testing.assert_close(head.weight, w0 - 0.25 * grad, rtol=0, atol=1e-6)
    assert head.momentum is None  # momentum 0 keeps no buffer


def test_grad_scale_unscales_and_nonfinite_is_reported_not_applied():
    margin = pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4)
    emb, labels = make_batches(1)[0]
    plain = pfc_ds.PartialFC(margin, D, C)
    scaled = pfc_ds.PartialFC(margin, D, C)
    opt_p = pfc_ds.SparseSGD(plain, lr=0.1, momentum=0.9)
    opt_s = pfc_ds.SparseSGD(scaled, lr=0.1, momentum=0.9)
    plain(emb, labels).backward()
    (scaled(emb, labels) * 1024.0).backward()
    assert opt_p.step() and opt_s.step(grad_scale=1024.0)
    torch.testing.assert_close(scaled.weight, plain.weight, rtol=1e-6, atol=0)

    opt_s.zero_grad()
    before_w, before_m = scaled.weight.clone(), scaled.momentum.clone()
    scaled(emb, labels).backward()
    scaled.window.grad[3, 1] = math.inf
    assert opt_s.has_nonfinite()
    applied = opt_s.step()  # a device flag, so the step itself makes no host sync
    assert applied.dtype == torch.bool and applied.dim() == 0 and not bool(applied)
    assert torch.equal(scaled.weight, before_w) and torch.equal(scaled.momentum, before_m)
    assert scaled.window is None  # consumed either way


class TestMargins:
    def test_arcface_gradient_is_exact_not_straight_through(self):
        cos = torch.tensor([[0.3, -0.2, 0.8]], dtype=torch.float64, requires_grad=True)
        labels = torch.tensor([2])
        out = pfc_ds.CombinedMarginLoss(2.0, 1.0, 0.5, 0.0)(cos, labels)
        out[0, 2].backward()
        exact = 2.0 * math.sin(math.acos(0.8) + 0.5) / math.sqrt(1 - 0.8**2)
        assert cos.grad[0, 2].item() == pytest.approx(exact, rel=1e-12)
        assert out[0, 2].item() == pytest.approx(2.0 * math.cos(math.acos(0.8) + 0.5), rel=1e-12)

    def test_straight_through_option_passes_s_through(self):
        cos = torch.tensor([[0.3, 0.8]], dtype=torch.float64, requires_grad=True)
        m = pfc_ds.CombinedMarginLoss(2.0, 1.0, 0.5, 0.0, straight_through=True)
        out = m(cos, torch.tensor([1]))
        out.sum().backward()
        assert out[0, 1].item() == pytest.approx(2.0 * math.cos(math.acos(0.8) + 0.5), rel=1e-12)
        assert cos.grad.tolist() == [[2.0, 2.0]]

    def test_arcface_gradient_finite_at_unit_cosine(self):
        cos = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], requires_grad=True)
        out = pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)(cos, torch.tensor([0, 0]))
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()

    def test_label_minus_one_rows_get_no_margin(self):
        cos = torch.tensor([[0.5, 0.1], [0.2, 0.4]])
        out = pfc_ds.CombinedMarginLoss(10.0, 1.0, 0.0, 0.3)(cos, torch.tensor([-1, 1]))
        torch.testing.assert_close(out, torch.tensor([[5.0, 1.0], [2.0, 1.0]]))

    def test_interclass_filtering_zeroes_hard_negatives_only(self):
        cos = torch.tensor([[0.9, 0.5, 0.1], [0.95, 0.2, 0.8]])
        out = pfc_ds.CombinedMarginLoss(1.0, 1.0, 0.0, 0.0, 0.4)(cos, torch.tensor([0, -1]))
        torch.testing.assert_close(out, torch.tensor([[0.9, 0.0, 0.1], [0.0, 0.2, 0.0]]))

    @pytest.mark.parametrize(
        ("args", "match"),
        [
            ((0.0, 1.0, 0.5, 0.0), "scale s"),
            ((64.0, 1.35, 0.0, 0.0), "m1=1.35"),
            ((64.0, 1.0, -0.1, 0.0), "m2"),
            ((64.0, 1.0, 0.0, 1.5), "m3"),
            ((64.0, 1.0, 0.5, 0.0, 1.0), "interclass_filtering_threshold"),
        ],
    )
    def test_invalid_combinations_raise_with_reason(self, args, match):
        with pytest.raises(ValueError, match=match):
            pfc_ds.CombinedMarginLoss(*args)

    def test_straight_through_needs_arcface_margin(self):
        with pytest.raises(ValueError, match="straight_through"):
            pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4, straight_through=True)
