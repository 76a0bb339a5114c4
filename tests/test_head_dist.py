"""W = 2 and 4 gloo ranks reproduce W = 1 (and the float64 reference) on the concatenated batch."""

import pytest
import torch

import pfc_ds
from tests import reference as ref
from tests.dist import run_distributed

C, D = 37, 16  # C % 4 != 0: uneven shards
S, M2, M3 = 64.0, 0.5, 0.0
LR, MOM, WD = 0.05, 0.9, 5e-4
# Uneven per-rank batches (the last-batch case insightface asserts on, #2015).
SPLITS = {1: [24], 2: [10, 14], 4: [5, 7, 6, 6]}


def global_batches(steps):
    g = torch.Generator().manual_seed(99)
    return [
        (torch.randn(24, D, generator=g), torch.randint(0, C, (24,), generator=g))
        for _ in range(steps)
    ]


def train_rank(rank, world_size, steps):
    """Each rank trains on its slice of the same global batches; returns what it saw."""
    head = pfc_ds.PartialFC(
        pfc_ds.CombinedMarginLoss(S, 1.0, M2, M3), D, C, sample_rate=1.0, seed=5
    )
    opt = pfc_ds.SparseSGD(head, lr=LR, momentum=MOM, weight_decay=WD)
    sizes = SPLITS[world_size]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    out = {"init": head.weight.clone(), "losses": [], "emb_grads": [], "start": head.class_start}
    for emb, labels in global_batches(steps):
        e = emb[lo:hi].clone().requires_grad_(True)
        loss = head(e, labels[lo:hi])
        loss.backward()
        assert opt.step()
        opt.zero_grad()
        out["losses"].append(loss.item())
        out["emb_grads"].append(e.grad)
    out["weight"], out["momentum"], out["state"] = head.weight, head.momentum, head.state_dict()
    return out


@pytest.fixture(scope="module")
def single():
    return train_rank(0, 1, steps=3)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_world_sizes_match_single_process_and_reference(world_size, single):
    results = run_distributed(train_rank, world_size, 3)
    # Shards tile the class range in order, with insightface's split.
    assert [r["start"] for r in results] == [
        pfc_ds.shard_range(C, world_size, r)[0] for r in range(world_size)
    ]
    # Same seed, same centres at any world size (bit-exact).
    assert torch.equal(torch.cat([r["init"] for r in results]), single["init"])
    for r in results:  # the loss is identical on every rank
        assert r["losses"] == results[0]["losses"]
    assert ref.rel_err(torch.tensor(results[0]["losses"]), torch.tensor(single["losses"])) < 1e-5

    # W x dL/de_local convention: concatenated grads / W == the W = 1 gradient.
    emb, labels = global_batches(1)[0]
    _, ref_demb, _ = ref.loss_and_grads(emb, single["init"], labels, S, M2, M3)
    grads = torch.cat([r["emb_grads"][0] for r in results]) / world_size
    assert ref.rel_err(grads, single["emb_grads"][0]) < 1e-5
    assert ref.rel_err(grads, ref_demb) < 1e-5

    weight = torch.cat([r["weight"] for r in results])
    momentum = torch.cat([r["momentum"] for r in results])
    assert ref.rel_err(weight, single["weight"]) < 1e-5
    assert ref.rel_err(momentum, single["momentum"]) < 1e-5
    ref_losses, ref_w, ref_buf = ref.sgd_steps(
        single["init"], global_batches(3), S, M2, M3, LR, MOM, WD
    )
    assert ref.rel_err(torch.tensor(results[0]["losses"]), torch.tensor(ref_losses)) < 1e-5
    assert ref.rel_err(weight, ref_w) < 1e-5 and ref.rel_err(momentum, ref_buf) < 1e-5
    for rank, r in enumerate(results):
        assert r["state"]["meta"] == {
            "num_classes": C,
            "world_size": world_size,
            "rank": rank,
            "class_start": r["start"],
            "num_local": pfc_ds.shard_range(C, world_size, rank)[1],
            "embedding_size": D,
        }


def sampled_rank(rank, world_size):
    """r = 0.1 on 2 ranks: every positive of the global batch is sampled on its owner."""
    head = pfc_ds.PartialFC(pfc_ds.CombinedMarginLoss(S, 1.0, 0.0, 0.4), D, 400, sample_rate=0.1)
    g = torch.Generator().manual_seed(rank)
    labels = torch.randint(0, 400, (6,), generator=g)
    loss = head(torch.randn(6, D, generator=g), labels)
    return {
        "labels": labels,
        "index": head.window.index + head.class_start,
        "loss": loss.item(),
    }


def test_every_global_positive_sampled_on_its_owner():
    results = run_distributed(sampled_rank, 2)
    positives = set(torch.cat([r["labels"] for r in results]).tolist())
    for rank, r in enumerate(results):
        start, n = pfc_ds.shard_range(400, 2, rank)
        mine = {p for p in positives if start <= p < start + n}
        assert mine <= set(r["index"].tolist())
        assert len(r["index"]) == max(int(0.1 * n), len(mine)) == 20
        assert r["index"].min() >= start and r["index"].max() < start + n
    assert results[0]["loss"] == results[1]["loss"]


def mismatched_rank(rank, world_size, state):
    head = pfc_ds.PartialFC(pfc_ds.CombinedMarginLoss(S, 1.0, 0.0, 0.4), D, C)
    try:
        head.load_state_dict(state)
    except ValueError as exc:
        return str(exc)
    return None


def test_loading_another_world_size_shard_raises(single):
    messages = run_distributed(mismatched_rank, 2, single["state"])
    assert all(m is not None and "world_size: checkpoint 1 != head 2" in m for m in messages)


def too_few_classes(rank, world_size):
    try:
        pfc_ds.PartialFC(pfc_ds.CombinedMarginLoss(S, 1.0, 0.0, 0.4), D, 1)
    except ValueError as exc:
        return str(exc)
    return None


def test_num_classes_below_world_size_raises():
    assert all("num_classes=1 < world_size=2" in m for m in run_distributed(too_few_classes, 2))


def bad_label_rank(rank, world_size):
    head = pfc_ds.PartialFC(pfc_ds.CombinedMarginLoss(S, 1.0, 0.0, 0.4), D, C)
    labels = torch.tensor([1, 2, C + 3]) if rank == 1 else torch.tensor([0, 4])
    try:
        head(torch.randn(len(labels), D), labels)
    except ValueError as exc:
        return str(exc)
    return None


def test_bad_label_on_one_rank_raises_on_every_rank_without_hanging():
    messages = run_distributed(bad_label_rank, 2)
    assert all(
        m is not None and f"label {C + 3} is outside [0, num_classes={C})" in m for m in messages
    )
