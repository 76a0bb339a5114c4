"""The head's collectives, counted and checked through the public API at W=2 and W=4.

A head step (forward, backward, optimizer step) makes at most three collectives for any margin
(AdaFace included),
dtype, bank and sample rate: one all-gather of embeddings with the labels' bits packed in, one
all-gather of per-row softmax statistics, one reduce-scatter of the embedding gradient. Uneven
batches add their size exchange; an accumulation window of K micro-batches gathers its labels
once and then makes three per micro-batch. Every ``torch.distributed`` collective is wrapped
and counted, so a later change cannot add one silently.
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch
import torch.distributed as dist

import pfc_ds
from tests.dist import run_distributed

# Everything in torch.distributed that moves data between ranks.
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "gather",
    "scatter",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
)


class Counter:
    """Counts calls of every collective while active (wrapping the module attributes)."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, object] = {}

    def __enter__(self) -> Counter:
        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            @functools.wraps(fn)
            def wrapped(*a, _fn=fn, _name=name, **k):
                self.calls[_name] += 1
                return _fn(*a, **k)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


MARGINS = {
    "cosface": lambda: pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4),
    "arcface": lambda: pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0),
    "filtered": lambda: pfc_ds.CombinedMarginLoss(
        32.0, 1.0, 0.3, 0.1, interclass_filtering_threshold=0.5
    ),
    # Its global norm statistics come from the gathered embeddings: no collective of its own.
    "adaface": lambda: pfc_ds.AdaFace(64.0, 0.4, 0.333, 0.01),
}


def _count_steps(rank, world, case, tmp):
    margin, dtype, bank, rate, micro, even, opt_name = case
    head = pfc_ds.PartialFC(
        MARGINS[margin](), 16, 203, sample_rate=rate, dtype=dtype, even_batches=even,
        bank=bank, bank_path=f"{tmp}/bank{rank}" if bank == "disk" else None, chunk=32,
    )  # fmt: skip
    if opt_name == "sgd":
        opt = pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        opt = pfc_ds.SparseAdamW(head, lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(rank)
    per_step = []
    for _ in range(3):
        size = 12 if even else 9 + rank
        batches = [
            (torch.randn(size, 16, generator=g).requires_grad_(True),
             torch.randint(0, 203, (size,), generator=g))
            for _ in range(micro)
        ]  # fmt: skip
        with Counter() as c:
            if micro > 1:
                head.prefetch([lab for _, lab in batches])
            for emb, lab in batches:
                (head(emb, lab) / micro).backward()
            opt.step()
            opt.zero_grad()
        per_step.append(dict(c.calls))
        assert all(torch.isfinite(e.grad).all() for e, _ in batches)
    return per_step


CASES = [
    # margin, storage dtype, bank, sample rate, micro-batches, even batches, optimizer
    ("cosface", torch.float32, "device", 1.0, 1, True, "sgd"),
    ("arcface", torch.float16, "device", 0.3, 1, True, "sgd"),
    ("filtered", torch.bfloat16, "device", 0.3, 1, True, "adamw"),
    ("cosface", torch.float16, "host", 0.3, 1, True, "sgd"),
    ("arcface", torch.float32, "disk", 0.5, 1, True, "adamw"),
    ("cosface", torch.float32, "device", 0.3, 1, False, "sgd"),
    ("arcface", torch.float32, "device", 0.3, 3, True, "sgd"),
    ("cosface", torch.float16, "host", 0.3, 2, False, "adamw"),
    ("adaface", torch.float32, "device", 0.3, 1, True, "sgd"),
    ("adaface", torch.float16, "device", 0.3, 2, False, "adamw"),
]


def _all_cases(rank, world, cases, tmp):
    return {case: _count_steps(rank, world, case, tmp) for case in cases}


# Offloaded banks at W=2 only: their collectives are the device bank's. One launch per world
# size runs all its cases.
@pytest.mark.parametrize("world", [2, 4])
def test_collectives_per_head_step(world, tmp_path):
    cases = [c for c in CASES if world == 2 or c[2] == "device"]
    results = run_distributed(_all_cases, world, cases, str(tmp_path))
    for case in cases:
        *_, micro, even, _ = case
        # One size exchange when batches may be uneven, one label gather per window of
        # several micro-batches, then three per micro-batch: embeddings (+labels),
        # statistics, gradient.
        expected = (0 if even else 1) + (1 if micro > 1 else 0) + 3 * micro
        if micro == 1 and even:
            assert expected == 3
        for rank_results in results:
            for calls in rank_results[case]:
                assert sum(calls.values()) == expected, (case, calls)
                assert calls.get("all_reduce", 0) == 0, (case, calls)
                scatters = calls.get("reduce_scatter_single", 0)
                scatters += calls.get("reduce_scatter_tensor", 0)
                assert scatters == micro, (case, calls)


def test_engine_opens_no_window_for_one_micro_batch_on_a_device_bank(tmp_path):
    """A one-micro-batch step lets the labels ride with the embeddings; a window of several,
    or an offloaded bank's prefetch, gathers them first."""
    device = pfc_ds.PartialFC(MARGINS["cosface"](), 16, 101, sample_rate=0.5)
    host = pfc_ds.PartialFC(MARGINS["cosface"](), 16, 101, sample_rate=0.5, bank="host")
    assert not device.offloaded and host.offloaded
    assert not device.window_needed(1, prefetched=True)
    assert device.window_needed(2, prefetched=True) and host.window_needed(2, prefetched=False)
    assert not host.window_needed(2, prefetched=True)  # the engine prefetched it already


def _gather(rank, world):
    from pfc_ds.head.collectives import gather_batch

    sizes = [3, 5, 2, 4][:world]
    g = torch.Generator().manual_seed(7)
    emb_all = torch.randn(sum(sizes), 6, generator=g)
    # Labels past 2^24 and 2^53 must arrive bit for bit (a float conversion would round them).
    labels_all = torch.tensor([2**24 + 1, 2**40 + 3, 2**53 + 1, 7, 0, 2**62 + 5, 1, 2, 3, 4,
                               5, 6, 8, 9][: sum(sizes)])  # fmt: skip
    lo = sum(sizes[:rank])
    mine = emb_all[lo : lo + sizes[rank]].clone().requires_grad_(True)
    out, labels = gather_batch(mine, labels_all[lo : lo + sizes[rank]], sizes, None)
    weights = torch.arange(out.numel(), dtype=torch.float32).view_as(out) * (rank + 1)
    (out * weights).sum().backward()
    return out.detach(), labels, mine.grad, emb_all, labels_all


@pytest.mark.parametrize("world", [2, 4])
def test_gather_batch_packs_labels_bit_exact_and_reduce_scatters_the_gradient(world):
    results = run_distributed(_gather, world)
    sizes = [3, 5, 2, 4][:world]
    for rank, (out, labels, grad, emb_all, labels_all) in enumerate(results):
        assert torch.equal(out, emb_all)
        assert labels.dtype == torch.int64 and torch.equal(labels, labels_all)
        # Each rank's loss weights the gathered rows by (rank + 1) * position: the true
        # gradient of a row is the sum over ranks, times W (the data-parallel mean's factor).
        total = sum(r + 1 for r in range(world))
        lo = sum(sizes[:rank])
        pos = torch.arange(out.numel(), dtype=torch.float32).view_as(out)[lo : lo + sizes[rank]]
        assert torch.equal(grad, pos * total * world)
