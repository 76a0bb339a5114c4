"""ShardPlan: disjoint, covering shards with the same step count on every rank."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.sampler import ShardPlan


def _epoch(n: int, b: int, w: int, last: str, epoch: int = 0, start: int = 0, shuffle: bool = True):
    plans = [ShardPlan(n, b, r, w, last, shuffle, seed=3) for r in range(w)]
    return [p.rank_batches(epoch, start) for p in plans]


@pytest.mark.parametrize("w", [2, 3])
def test_pad_shards_are_disjoint_cover_all_and_equal_length(w: int) -> None:
    n, b = 103, 8
    out = _epoch(n, b, w, "pad")
    steps = {idx.shape[0] for idx, _ in out}
    assert steps == {-(-n // (w * b))}
    new = np.concatenate([idx[k, :v] for idx, valid in out for k, v in enumerate(valid)])
    assert sorted(new.tolist()) == list(range(n))  # every image exactly once
    pads = np.concatenate([idx[k, v:] for idx, valid in out for k, v in enumerate(valid)])
    assert pads.size == sum(idx.size for idx, _ in out) - n  # the rest is repeats of real images
    assert np.isin(pads, np.arange(n)).all()


@pytest.mark.parametrize("w", [2, 3])
def test_drop_shards_are_disjoint_and_full(w: int) -> None:
    n, b = 103, 8
    out = _epoch(n, b, w, "drop")
    assert {idx.shape for idx, _ in out} == {(n // (w * b), b)}
    seen = np.concatenate([idx.ravel() for idx, _ in out])
    assert len(set(seen.tolist())) == seen.size == (n // (w * b)) * w * b
    assert all((valid == b).all() for _, valid in out)


def test_valid_counts_of_the_padded_last_batch() -> None:
    out = _epoch(50, 8, 3, "pad", shuffle=False)  # global batch 24: steps 3, last holds 2 new
    assert [valid.tolist() for _, valid in out] == [[8, 8, 2], [8, 8, 0], [8, 8, 0]]
    assert out[0][0][2].tolist() == [48, 49, 0, 1, 2, 3, 4, 5]  # pad wraps to the order's start


def test_order_is_shared_per_epoch_and_changes_between_epochs() -> None:
    a = ShardPlan(100, 4, 0, 2, seed=7)
    b = ShardPlan(100, 4, 1, 2, seed=7)
    assert (a.order(0) == b.order(0)).all()
    assert not (a.order(0) == a.order(1)).all()
    assert (ShardPlan(100, 4, 0, 2, shuffle=False).order(5) == np.arange(100)).all()


def test_resume_from_a_position_continues_the_same_order() -> None:
    full, _ = _epoch(100, 4, 2, "drop", epoch=2)[1]
    tail, _ = _epoch(100, 4, 2, "drop", epoch=2, start=5 * 8)[1]
    assert (tail == full[5:]).all()
    # a position saved at world size 2 is a global sample count: world size 4 continues it
    four = [ShardPlan(100, 4, r, 4, "drop", seed=3).rank_batches(2, 40)[0] for r in range(4)]
    two = [ShardPlan(100, 4, r, 2, "drop", seed=3).rank_batches(2, 40)[0] for r in range(2)]
    assert sorted(np.concatenate([x.ravel() for x in four]).tolist()) == sorted(
        np.concatenate([x[: 2 * (x.shape[0] // 2)].ravel() for x in two]).tolist()
    )


def test_too_few_images_for_one_global_batch() -> None:
    with pytest.raises(ValueError, match="10 images make no full global batch of 4 ranks x 8"):
        ShardPlan(10, 8, 0, 4, "drop")
    assert ShardPlan(10, 8, 3, 4, "pad").steps(0) == 1
    with pytest.raises(ValueError, match="rank 4 is outside world size 4"):
        ShardPlan(10, 8, 4, 4, "pad")


def _reference_batches(plan: ShardPlan, epoch: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    """The formula before int32 orders and per-rank views: int64 positions into a full order."""
    steps = plan.steps(start)
    pos = (
        start
        + np.arange(steps, dtype=np.int64)[:, None] * plan.global_batch
        + plan.rank * plan.batch_size
        + np.arange(plan.batch_size, dtype=np.int64)[None, :]
    )
    n = plan.num_images
    order = (
        np.random.default_rng([plan.seed, epoch]).permutation(n) if plan.shuffle else np.arange(n)
    )
    return order[pos % n], np.clip(n - pos[:, 0], 0, plan.batch_size)


def test_rank_batches_are_the_same_values_as_before_in_int32() -> None:
    """int32 orders and per-rank views change no index: resume and sharding stay bit-identical."""
    cases = 0
    for n in (1, 7, 10, 50, 103, 1000):
        for b in (1, 3, 8):
            for w in (1, 2, 3, 4):
                for last in ("drop", "pad"):
                    for shuffle in (True, False):
                        gb = b * w
                        for start in sorted({0, gb, 3 * gb, (n // gb) * gb, n + gb}):
                            for r in range(w):
                                try:
                                    plan = ShardPlan(n, b, r, w, last, shuffle, seed=5)
                                except ValueError:
                                    continue
                                got, valid = plan.rank_batches(2, start)
                                want, want_valid = _reference_batches(plan, 2, start)
                                assert got.dtype == np.int32 and got.shape == want.shape
                                assert (got == want).all() and (valid == want_valid).all()
                                cases += 1
    assert cases > 1000
    big = ShardPlan(3_000_017, 64, 1, 4, "pad", seed=9)  # a large n, checked once
    np.testing.assert_array_equal(big.rank_batches(1, 256)[0], _reference_batches(big, 1, 256)[0])
    np.testing.assert_array_equal(
        big.order(4), np.random.default_rng([9, 4]).permutation(3_000_017)
    )
