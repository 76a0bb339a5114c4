"""The head's step on a GPU, audited on this CPU through the public API.

* No host syncs: on a GPU each sync (``.item()``, ``bool(t)``, ``nonzero``, ``unique``, a boolean
  mask...) stalls the launch queue. ``SyncAudit`` counts them over forward, backward (the
  autograd Functions' backwards included), the optimizer step and ``zero_grad``.
* Device discipline: ``DeviceAudit`` runs the head as if its compute device were a GPU (the
  stand-in ``FAKE_GPU``) and a host or disk bank's rows lived on the CPU, and records every op
  that mixes the two, every sync on a GPU tensor and every blocking or pageable copy between
  them, for every bank, accumulation 1 and 2, SGD and AdamW, fp32/fp16/bf16. The host and disk
  banks' lane thread is audited too. The number is 0 for every bank: an offloaded bank's index,
  rows and updates cross through pinned buffers without blocking, ordered by events.
"""

from __future__ import annotations

import pytest
import torch

import pfc_ds
from tests.audit import FAKE_GPU, DeviceAudit, SyncAudit
from tests.dist import run_distributed


def _head(rate: float, dtype: torch.dtype, num_classes: int = 2000, **kw) -> pfc_ds.PartialFC:
    margin = pfc_ds.CombinedMarginLoss(32.0, 1.0, 0.3, 0.1, interclass_filtering_threshold=0.9)
    return pfc_ds.PartialFC(
        margin, 16, num_classes, sample_rate=rate, dtype=dtype, even_batches=True, chunk=64, **kw
    )


def _steps(head, opt, micro: int, g: torch.Generator, device=None, steps: int = 2) -> None:
    for _ in range(steps):
        batches = [
            (
                torch.randn(24, 16, generator=g, device=device).requires_grad_(True),
                torch.randint(0, head.num_classes, (24,), generator=g, device=device),
            )
            for _ in range(micro)
        ]
        head.prefetch([labels for _, labels in batches])
        for emb, labels in batches:
            (head(emb, labels) / micro).backward()
        opt.has_nonfinite()
        opt.step(grad_scale=torch.full((), 2.0, device=device))
        opt.zero_grad()


def _audited_steps(rate: float, dtype: torch.dtype, micro: int, rank: int = 0) -> list[str]:
    head = _head(rate, dtype)
    opt = pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(rank)
    audit = SyncAudit()
    with audit:
        _steps(head, opt, micro, g)
    return audit.calls


@pytest.mark.parametrize(
    ("rate", "dtype", "micro"),
    [
        (0.1, torch.float32, 1),  # sparse sampler
        (0.6, torch.float16, 1),  # dense sampler, fp16 stochastic rounding
        (0.005, torch.bfloat16, 1),  # positives may exceed the 10 slots: masked columns
        (1.0, torch.float32, 1),  # the whole shard, updated in place
        (0.1, torch.float32, 2),  # accumulation: one window of two micro-batches
    ],
)
def test_head_step_makes_no_host_sync_single_process(rate, dtype, micro):
    assert _audited_steps(rate, dtype, micro) == []


def test_the_audit_sees_syncs_in_backward():
    audit = SyncAudit()
    t = torch.arange(5)

    class Item(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            g.sum().item()
            return g

    with audit:
        t.sum().item()
        _ = t[t > 2]
        torch.unique(t)
        bool(t.any())
        Item.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert audit.calls == ["item", "__getitem__[bool]", "unique", "__bool__", "item"]


def test_the_device_audit_sees_mixing_syncs_and_blocking_copies():
    audit = DeviceAudit()
    with audit:
        gpu = torch.ones(4, device=FAKE_GPU)
        cpu = torch.arange(4)
        assert gpu.device == FAKE_GPU and cpu.device.type == "cpu"
        gpu.index_select(0, cpu)  # an index on the other device
        gpu + torch.tensor(1.0)  # a 0-dim CPU tensor is a scalar: fine
        gpu.sum().item()
        gpu.cpu()
        gpu.copy_(cpu.float(), non_blocking=True)  # pageable: syncs the stream
        torch.tensor([1, 2], device=FAKE_GPU)
        moved = cpu.to(FAKE_GPU, non_blocking=True)
        assert moved.device == FAKE_GPU
    assert [m.split(" mixes")[0] for m in audit.mixed] == ["index_select"]
    assert [c.split(" at")[0] for c in audit.calls] == ["item"]
    assert [c.split(" at")[0] for c in audit.copies] == [
        "cpu gpu->cpu",
        "pageable copy_ cpu->gpu",
        "tensor(device=gpu)",
        "to cpu->gpu",
    ]


OPTIMIZERS = {
    "sgd": lambda h: pfc_ds.SparseSGD(h, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adamw": lambda h: pfc_ds.SparseAdamW(h, lr=0.01),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("micro", [1, 2])
@pytest.mark.parametrize("bank", ["device", "host", "disk"])
def test_device_discipline(tmp_path, bank, micro, opt, dtype):
    audit = DeviceAudit()
    g = torch.Generator().manual_seed(0)
    with audit.patched(), audit:
        audit.recording = False  # building the head uploads its bank once: not a step
        head = _head(0.1, dtype, device=FAKE_GPU, bank=bank, bank_path=str(tmp_path),
                     gemm_dtype=None if dtype == torch.float32 else dtype)  # fmt: skip
        optimizer = OPTIMIZERS[opt](head)
        audit.recording = True
        _steps(head, optimizer, micro, g, device=FAKE_GPU)
        head.bank.flush()
    assert audit.mixed == []
    assert audit.calls == []
    assert audit.copies == []


def _worker(rank: int, world: int) -> list[str]:
    return _audited_steps(0.1, torch.float16, 2, rank)


@pytest.mark.slow
def test_head_step_makes_no_host_sync_two_ranks():
    assert run_distributed(_worker, 2) == [[], []]
