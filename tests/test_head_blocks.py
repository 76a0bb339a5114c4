"""The sparse optimizers update the sampled rows block by block (buffers of one block, not
S x D): the result is bit-identical to one block, in half storage too (its rounding bits do
not depend on the block); the forward's dtype-changing gather is blocked too."""

from __future__ import annotations

import pytest
import torch

import pfc_ds
from pfc_ds.head import bank as bank_module
from pfc_ds.head import partial_fc


def _run(opt_name: str, dtype: torch.dtype, block_bytes: int | None, monkeypatch, accum: int = 1):
    if block_bytes is not None:
        monkeypatch.setattr(partial_fc, "ROW_BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(bank_module, "GATHER_BLOCK", 5 * 16)  # 5 rows of D=16
    torch.manual_seed(0)
    head = pfc_ds.PartialFC(
        pfc_ds.CombinedMarginLoss(32.0, 1.0, 0.0, 0.3), 16, 400, sample_rate=0.2, dtype=dtype,
        even_batches=True,
    )  # fmt: skip
    if opt_name == "sgd":
        opt = pfc_ds.SparseSGD(head, lr=0.5, momentum=0.9, weight_decay=5e-4)
    else:
        opt = pfc_ds.SparseAdamW(head, lr=0.01, weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        micro = [
            (torch.randn(12, 16, generator=g, requires_grad=True), torch.randint(0, 400, (12,), generator=g))
            for _ in range(accum)
        ]  # fmt: skip
        head.prefetch([labels for _, labels in micro])
        for emb, labels in micro:
            head(emb, labels).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("accum", [1, 2])
def test_blocks_are_bit_identical_in_fp32(monkeypatch, opt_name, accum):
    whole = _run(opt_name, torch.float32, None, monkeypatch, accum)
    blocked = _run(opt_name, torch.float32, 7 * 16 * 4, monkeypatch, accum)  # 7 rows a block
    for k in whole:
        assert torch.equal(whole[k], blocked[k]), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blocks_are_bit_identical_in_half_storage(monkeypatch, dtype):
    """The rounding bits are a function of (step, row, column), not of the block a row is in."""
    whole = _run("sgd", dtype, None, monkeypatch)
    blocked = _run("sgd", dtype, 7 * 16 * 4, monkeypatch)
    for k in ("weight", "momentum"):
        assert torch.equal(whole[k], blocked[k]), k


def test_half_gather_is_blocked_and_exact(monkeypatch):
    monkeypatch.setattr(bank_module, "GATHER_BLOCK", 3 * 8)
    w = torch.randn(50, 8).to(torch.float16)
    bank = bank_module.CenterBank(w.clone())
    rows = torch.tensor([4, 0, 49, 7, 7, 20, 33])
    out = bank.gather(rows, out=torch.empty(7, 8))
    assert torch.equal(out, w[rows].float())
    assert bank.nbytes()["staging"] == 3 * 8 * 2  # one block of fp16 rows
