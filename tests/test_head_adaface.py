"""AdaFace as the head's margin: W = 1, 2 and 4 against a float64 full-softmax reference of
mk-minchul/AdaFace ``head.py`` (tests/reference.py), the running statistics as state."""

from __future__ import annotations

import math
import re

import pytest
import torch

import pfc_ds
from pfc_ds.head.reshard import reshard
from tests import reference as ref
from tests.audit import SyncAudit
from tests.dist import run_distributed

pytestmark = pytest.mark.usefixtures("head_ops")  # compiled kernels and eager ops

C, D = 37, 16  # C % 4 != 0: uneven shards
# A large t_alpha (the statistics move visibly) and h (scalers reach their clip at 1).
S, M, H, T_ALPHA = 32.0, 0.4, 1.5, 0.3
LR, MOM, WD = 0.05, 0.9, 5e-4
SPLITS = {1: [24], 2: [10, 14], 4: [5, 7, 6, 6]}  # uneven per-rank batches
TOL = 1e-5


def global_steps(steps: int, micro: int):
    """``steps`` optimizer steps of ``micro`` global micro-batches of 24 rows whose norms spread
    from about 0.3 to 200 (see ``test_the_batches_reach_the_clips``)."""
    g = torch.Generator().manual_seed(10_099)
    out = []
    for _ in range(steps):
        batches = []
        for _ in range(micro):
            scale = torch.exp(torch.empty(24, 1).uniform_(-1.2, 5.3, generator=g))
            emb = torch.randn(24, D, generator=g) / math.sqrt(D) * scale
            batches.append((emb, torch.randint(0, C, (24,), generator=g)))
        out.append(batches)
    return out


def train_rank(rank, world_size, steps, micro, chunk):
    """Each rank trains on its slice of the same global micro-batches."""
    head = pfc_ds.PartialFC(pfc_ds.AdaFace(S, M, H, T_ALPHA), D, C, seed=5, chunk=chunk)
    opt = pfc_ds.SparseSGD(head, lr=LR, momentum=MOM, weight_decay=WD)
    sizes = SPLITS[world_size]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    out = {"init": head.weight.clone(), "losses": [], "emb_grads": [], "stats": []}
    for batches in global_steps(steps, micro):
        if micro > 1:
            head.prefetch([labels[lo:hi] for _, labels in batches])
        for emb, labels in batches:
            e = emb[lo:hi].clone().requires_grad_(True)
            loss = head(e, labels[lo:hi])
            (loss / micro).backward()
            out["losses"].append(loss.item())
            out["emb_grads"].append(e.grad * micro)
        assert opt.step()
        opt.zero_grad()
        out["stats"].append(
            (head.margin_loss.batch_mean.clone(), head.margin_loss.batch_std.clone())
        )
    out["weight"], out["momentum"] = head.weight.clone(), head.momentum.clone()
    out["state"] = {k: v.clone() if torch.is_tensor(v) else v for k, v in head.state_dict().items()}
    return out


def reference(init, steps, micro):
    ada = ref.AdaFaceReference(S, M, H, T_ALPHA)
    return ref.adaface_sgd_steps(init, global_steps(steps, micro), ada, LR, MOM, WD)


@pytest.fixture(scope="module")
def single():
    return {micro: train_rank(0, 1, 2, micro, 8) for micro in (1, 2)}


@pytest.mark.parametrize("micro", [1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_world_sizes_match_the_float64_reference(world_size, micro, single):
    results = run_distributed(train_rank, world_size, 2, micro, 8)
    init = torch.cat([r["init"] for r in results])
    losses, grads, stats, ref_w, ref_buf = reference(init, 2, micro)
    assert len(stats) == 2 and len(losses) == 2 * micro
    for r in results:  # loss and statistics identical on every rank
        assert r["losses"] == results[0]["losses"]
        for (mean, std), (mean0, std0) in zip(r["stats"], results[0]["stats"], strict=True):
            assert torch.equal(mean, mean0) and torch.equal(std, std0)
    # The statistics are the global batch's, computed from the same gathered rows: the same
    # bits at any world size.
    for (mean, std), (mean1, std1) in zip(results[0]["stats"], single[micro]["stats"], strict=True):
        assert torch.equal(mean, mean1) and torch.equal(std, std1)
    for (mean, std), (rmean, rstd) in zip(results[0]["stats"], stats, strict=True):
        assert mean.dtype == torch.float32 and mean.dim() == 0
        assert abs(mean.item() - rmean.item()) / rmean.item() < 1e-6
        assert abs(std.item() - rstd.item()) / rstd.item() < 1e-6
    assert abs(stats[-1][0] - 20) > 0.5 and stats[-1][1] < 90.0  # they moved from (20, 100)

    assert ref.rel_err(torch.tensor(results[0]["losses"]), torch.tensor(losses)) < TOL
    for k, ref_grad in enumerate(grads):  # W x dL/de_local convention
        grad = torch.cat([r["emb_grads"][k] for r in results]) / world_size
        assert ref.rel_err(grad, ref_grad) < TOL
    weight = torch.cat([r["weight"] for r in results])
    momentum = torch.cat([r["momentum"] for r in results])
    assert ref.rel_err(weight, ref_w) < TOL
    assert ref.rel_err(momentum, ref_buf) < TOL
    assert ref.rel_err(weight - init, ref_w - init.double()) < 1e-4  # the update itself


def test_the_batches_reach_the_clips():
    """The batches exercise the formulas' clips (else the test above proves less): norms above
    100 and margin scalers clipped at 1, and scalers of both signs."""
    ada = ref.AdaFaceReference(S, M, H, T_ALPHA)
    init = ref.unit_rows(C, D, 0)
    ref.adaface_sgd_steps(init, global_steps(2, 2), ada, LR, MOM, WD)
    norms = torch.cat([e.norm(dim=1) for step in global_steps(2, 2) for e, _ in step])
    scalers = torch.cat(ada.scalers)
    assert len(ada.scalers) == 4 and norms.max() > 100 and norms.min() < 1
    assert scalers.max() == 1.0 and scalers.min() < -0.3 and (scalers == 1.0).float().mean() < 0.5


def test_single_process_forward_matches_reference():
    torch.manual_seed(3)
    cos = torch.rand(6, 9, dtype=torch.float64) * 2 - 1
    cos[0, 2] = 1.0  # clamped
    norms = torch.tensor([0.5, 3.0, 10.0, 25.0, 60.0, 200.0], dtype=torch.float64)
    labels = torch.tensor([2, 0, 8, 4, 4, 1])
    margin = pfc_ds.AdaFace(64.0, 0.4, 0.333, 0.01).double()
    out = margin(cos, norms, labels)
    ada = ref.AdaFaceReference(64.0, 0.4, 0.333, 0.01)
    expected = _reference_from_cosines(ada, cos, norms, labels)
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)
    assert margin.batch_mean.item() == pytest.approx(ada.batch_mean.item(), rel=1e-12)
    assert margin.batch_std.item() == pytest.approx(ada.batch_std.item(), rel=1e-12)


def _reference_from_cosines(ada, cos, norms, labels):
    """``AdaFaceReference.logits`` after its GEMM, on given cosines (the same lines)."""
    eps = ada.eps
    cosine = cos.clamp(-1 + eps, 1 - eps)
    safe = torch.clip(norms[:, None], min=0.001, max=100)
    mean, std = safe.mean(), safe.std()
    ada.batch_mean = mean * ada.t_alpha + (1 - ada.t_alpha) * ada.batch_mean
    ada.batch_std = std * ada.t_alpha + (1 - ada.t_alpha) * ada.batch_std
    scaler = torch.clip((safe - ada.batch_mean) / (ada.batch_std + eps) * ada.h, -1, 1)
    onehot = torch.zeros_like(cosine).scatter_(1, labels.reshape(-1, 1), 1.0)
    theta_m = torch.clip(cosine.acos() + onehot * (-ada.m * scaler), eps, math.pi - eps)
    return (theta_m.cos() - onehot * (ada.m + ada.m * scaler)) * ada.s


@pytest.mark.parametrize("chunk", [None, 4])
def test_clamped_cosines_get_zero_gradient(chunk):
    """Embeddings on a centre's direction: cos = 1 > 1 - 1e-3 is clamped, for a target and for
    a negative; the reference's autograd through the clamp gives them zero gradient."""
    head = pfc_ds.PartialFC(pfc_ds.AdaFace(S, M, H, T_ALPHA), D, C, seed=5, chunk=chunk)
    w0 = head.weight.clone()
    (emb, labels) = global_steps(1, 1)[0][0]
    emb = emb.clone()
    emb[0] = _near(w0[7], emb[0], 0.9996) * 4.0  # a negative above 1 - 1e-3 (label 3)
    labels[0] = 3
    emb[1] = _near(w0[11], emb[1], 0.9995) * 0.7  # its own target above 1 - 1e-3
    labels[1] = 11
    e = emb.clone().requires_grad_(True)
    loss = head(e, labels)
    loss.backward()
    grad_w = head.window.row_grad()  # grad + coef * rows

    ada = ref.AdaFaceReference(S, M, H, T_ALPHA)
    e64 = emb.double().requires_grad_(True)
    w64 = w0.double().requires_grad_(True)
    ref_loss = ada.loss(e64, w64, labels)
    ref_loss.backward()
    cos = (
        torch.nn.functional.normalize(emb.double(), dim=1)
        @ torch.nn.functional.normalize(w0.double(), dim=1).t()
    )
    assert cos[0, 7] > 1 - 1e-3 and cos[1, 11] > 1 - 1e-3 and (cos > 1 - 1e-3).sum() == 2
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < TOL
    assert ref.rel_err(e.grad, e64.grad) < TOL
    assert ref.rel_err(grad_w, w64.grad) < TOL

    # Without the zeroing the negative's gradient would be the softmax's, far from zero: the
    # reference with a straight-through clamp shows how much the test would see.
    ada2 = ref.AdaFaceReference(S, M, H, T_ALPHA)
    straight = _straight_through_clamp_loss(ada2, emb.double().requires_grad_(True), w0, labels)
    assert ref.rel_err(straight[0], e64.grad) > 1e-3


def _near(centre: torch.Tensor, other: torch.Tensor, cos: float) -> torch.Tensor:
    """A unit vector at cosine ``cos`` from ``centre`` (not on it: on the centre itself the
    cosine's gradient vanishes anyway, clamped or not)."""
    c = centre / centre.norm()
    u = other - (other @ c) * c
    return cos * c + math.sqrt(1 - cos**2) * u / u.norm()


def _straight_through_clamp_loss(ada, e, w0, labels):
    cos_raw = (
        torch.nn.functional.normalize(e, dim=1)
        @ torch.nn.functional.normalize(w0.double(), dim=1).t()
    )
    clamped = cos_raw.clamp(-1 + ada.eps, 1 - ada.eps)
    cos = cos_raw + (clamped - cos_raw).detach()
    norms = e.norm(dim=1, keepdim=True).detach().clip(0.001, 100)
    mean, std = norms.mean(), norms.std()
    ada.batch_mean = mean * ada.t_alpha + (1 - ada.t_alpha) * ada.batch_mean
    ada.batch_std = std * ada.t_alpha + (1 - ada.t_alpha) * ada.batch_std
    scaler = torch.clip((norms - ada.batch_mean) / (ada.batch_std + ada.eps) * ada.h, -1, 1)
    onehot = torch.zeros_like(cos).scatter_(1, labels.reshape(-1, 1), 1.0)
    target = torch.cos(torch.clip(cos.clamp(-1 + ada.eps, 1 - ada.eps).acos() - ada.m * scaler,
                                  ada.eps, math.pi - ada.eps)) - (ada.m + ada.m * scaler)  # fmt: skip
    logits = torch.where(onehot.bool(), target, cos) * ada.s
    loss = torch.nn.functional.cross_entropy(logits, labels)
    return torch.autograd.grad(loss, e)


def test_adaface_step_makes_no_host_sync():
    head = pfc_ds.PartialFC(pfc_ds.AdaFace(), 16, 500, sample_rate=0.1, even_batches=True, chunk=16)
    opt = pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    audit = SyncAudit()
    with audit:
        for _ in range(2):
            batches = [
                (torch.randn(24, 16, generator=g).requires_grad_(True),
                 torch.randint(0, 500, (24,), generator=g))
                for _ in range(2)
            ]  # fmt: skip
            head.prefetch([lab for _, lab in batches])
            for emb, lab in batches:
                (head(emb, lab) / 2).backward()
            opt.step()
            opt.zero_grad()
    assert audit.calls == []
    assert head.margin_loss.batch_mean.device == head.weight.device


def test_argument_validation():
    for kwargs, text in [
        ({"s": 0.0}, "scale s must be > 0"),
        ({"m": -0.1}, "margin m must be in [0, pi/2)"),
        ({"m": 2.0}, "margin m must be in [0, pi/2)"),
        ({"h": -1.0}, "h must be >= 0"),
        ({"t_alpha": 1.5}, "t_alpha must be in [0, 1]"),
    ]:
        with pytest.raises(ValueError, match=re.escape(text)):
            pfc_ds.AdaFace(**kwargs)
    margin = pfc_ds.AdaFace()
    assert repr(margin) == "AdaFace(s=64.0, m=0.4, h=0.333, t_alpha=0.01)"
    with pytest.raises(ValueError, match="needs row_state"):
        margin.target_logit(torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2 rows"):
        margin.row_state(torch.ones(1))


# ---- state -------------------------------------------------------------------------------------


def test_state_dict_round_trip_keeps_the_statistics(single):
    state = single[2]["state"]
    assert set(k for k in state if "." in k) == {"margin_loss.batch_mean", "margin_loss.batch_std"}
    head = pfc_ds.PartialFC(pfc_ds.AdaFace(S, M, H, T_ALPHA), D, C, seed=1)
    head.load_state_dict(state)
    assert torch.equal(head.margin_loss.batch_mean, single[2]["stats"][-1][0])
    assert torch.equal(head.margin_loss.batch_std, single[2]["stats"][-1][1])
    assert torch.equal(head.weight, single[2]["weight"])


def test_margin_state_mismatch_is_one_clear_error(single):
    ada_state = single[2]["state"]
    arc = pfc_ds.PartialFC(pfc_ds.CombinedMarginLoss(S, 1.0, 0.5, 0.0), D, C)
    with pytest.raises(ValueError, match="this head's margin CombinedMarginLoss has none"):
        arc.load_state_dict(ada_state)
    plain = {k: v for k, v in ada_state.items() if not k.startswith("margin_loss.")}
    ada = pfc_ds.PartialFC(pfc_ds.AdaFace(), D, C)
    with pytest.raises(ValueError, match="holds margin state none, this head's margin AdaFace"):
        ada.load_state_dict(plain)
    arc.load_state_dict(plain)  # CombinedMarginLoss shards load as before


def _after_reshard(rank, world_size, shards):
    head = pfc_ds.PartialFC(pfc_ds.AdaFace(S, M, H, T_ALPHA), D, C)
    head.load_state_dict(shards[rank])
    return head.margin_loss.batch_mean, head.margin_loss.batch_std, head.weight.clone()


def test_reshard_keeps_the_statistics(tmp_path):
    results = run_distributed(train_rank, 2, 2, 2, 8)
    shards = [r["state"] for r in results]
    mean, std = results[0]["stats"][-1]
    (one,) = reshard(shards, 1)
    head = pfc_ds.PartialFC(pfc_ds.AdaFace(S, M, H, T_ALPHA), D, C)
    head.load_state_dict(one)
    assert torch.equal(head.margin_loss.batch_mean, mean)
    assert torch.equal(head.margin_loss.batch_std, std)
    assert torch.equal(head.weight, torch.cat([r["weight"] for r in results]))
    # Through the shard files, as the trainer and `python -m pfc_ds.tools.reshard` read them.
    from pfc_ds.checkpoint.shard_files import file_shard, find_shards, save_shard, shard_name

    for rank, shard in enumerate(shards):
        save_shard(shard, tmp_path / shard_name(rank, 2))
    paths = find_shards(tmp_path)
    head = pfc_ds.PartialFC(pfc_ds.AdaFace(S, M, H, T_ALPHA), D, C)
    head.load_state_dict(file_shard(paths, 1, 0, seed=0))
    assert torch.equal(head.margin_loss.batch_mean, mean)
    assert torch.equal(head.margin_loss.batch_std, std)
    # And back to 4 ranks: every rank gets the same statistics.
    four = reshard(shards, 4)
    for got_mean, got_std, _ in run_distributed(_after_reshard, 4, four):
        assert torch.equal(got_mean, mean) and torch.equal(got_std, std)
