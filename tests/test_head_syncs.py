"""The head's step makes no host-synchronising call, audited through the public API.

On a GPU each sync (``.item()``, ``bool(t)``, ``nonzero``, ``unique``, a boolean mask...) stalls
the launch queue. A ``TorchFunctionMode`` sees every tensor call made from Python, autograd
Functions' backward included, so counting the syncing ones over forward, backward,
``SparseSGD.step`` and ``zero_grad`` audits the step on this CPU as it would run on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import pfc_ds
from tests.dist import run_distributed

_SYNCING = {
    "item",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "tolist",
    "cpu",
    "numpy",
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "masked_select",
}


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def _has_bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncAudit(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name in _SYNCING:
            self.calls.append(name)
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and _has_bool_index(
            args
        ):
            self.calls.append(f"{name}[bool]")
        elif name == "where" and len(args) == 1 and not kwargs:
            self.calls.append("where(cond)")
        elif (
            name == "repeat_interleave"
            and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor)
            and "output_size" not in kwargs
        ):  # tensor repeats: the output size is data
            self.calls.append(name)
        return func(*args, **kwargs)


def _head(rate: float, dtype: torch.dtype, num_classes: int = 2000, **kw) -> pfc_ds.PartialFC:
    margin = pfc_ds.CombinedMarginLoss(32.0, 1.0, 0.3, 0.1, interclass_filtering_threshold=0.9)
    return pfc_ds.PartialFC(
        margin, 16, num_classes, sample_rate=rate, dtype=dtype, even_batches=True, chunk=64, **kw
    )


def _audited_steps(rate: float, dtype: torch.dtype, micro: int, rank: int = 0) -> list[str]:
    head = _head(rate, dtype)
    opt = pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(rank)
    audit = SyncAudit()
    for _ in range(2):  # optimizer steps
        with audit:
            for _ in range(micro):
                emb = torch.randn(24, 16, generator=g, requires_grad=True)
                labels = torch.randint(0, head.num_classes, (24,), generator=g)
                head(emb, labels).backward()
            opt.has_nonfinite()
            opt.step(grad_scale=torch.tensor(2.0))
            opt.zero_grad()
    return audit.calls


@pytest.mark.parametrize(
    ("rate", "dtype", "micro"),
    [
        (0.1, torch.float32, 1),  # sparse sampler
        (0.6, torch.float16, 1),  # dense sampler, fp16 stochastic rounding
        (0.005, torch.bfloat16, 1),  # positives may exceed the 10 slots: masked columns
        (1.0, torch.float32, 1),  # the whole shard, updated in place
        (0.1, torch.float32, 2),  # accumulation: the union of two micro-batches
    ],
)
def test_head_step_makes_no_host_sync_single_process(rate, dtype, micro):
    assert _audited_steps(rate, dtype, micro) == []


def test_the_audit_sees_syncs():
    audit = SyncAudit()
    t = torch.arange(5)
    with audit:
        t.sum().item()
        _ = t[t > 2]
        torch.unique(t)
        bool(t.any())
    assert audit.calls == ["item", "__getitem__[bool]", "unique", "__bool__"]


def _worker(rank: int, world: int) -> list[str]:
    return _audited_steps(0.1, torch.float16, 2, rank)


@pytest.mark.slow
def test_head_step_makes_no_host_sync_two_ranks():
    assert run_distributed(_worker, 2) == [[], []]
