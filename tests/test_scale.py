"""``pfc_ds.scale``: the memory model against the live buffers (exactly) and against measured
peaks (within 15 %), the sweep's records, the ``--model`` mode and the per-row fit."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import pfc_ds
from pfc_ds.head import bank as bank_module
from pfc_ds.head import cpu_kernels, partial_fc
from pfc_ds.scale import __main__ as cli
from pfc_ds.scale.model import BackboneSpec, HeadSpec, backbone_bytes, head_bytes, max_ids, predict
from pfc_ds.scale.report import fit_per_row

_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RECORD_FIELDS = {
    "ids",
    "sample_rate",
    "world_size",
    "embedding_size",
    "dtype",
    "batch_size",
    "step_ms",
    "peak_mem_mb",
    "bank_mb",
    "predicted_mem_mb",
}


@pytest.mark.parametrize(
    "store,gemm,opt,rate,mom",
    [
        c
        for c in itertools.product(
            ["fp32", "fp16", "bf16"],
            [None, "same"],
            ["sgd", "adamw"],
            [0.1, 1.0, 0.002],
            [None, "fp32"],
        )
        if not (c[0] == "fp32" and c[1] == "same")
    ],
)
@pytest.mark.parametrize("blocks,micro", [(False, 1), (True, 1), (False, 2)])
def test_head_terms_equal_live_buffers(store, gemm, opt, rate, mom, blocks, micro, monkeypatch):
    """Bank, optimizer state and workspace bytes after two steps equal the model's terms, with
    the default blocks, with blocks small enough to split the sampled rows, and with two
    micro-batches a step (one window: nothing more, but a sample sized for both)."""
    if blocks:
        monkeypatch.setattr(partial_fc, "ROW_BLOCK_BYTES", 40 * 16 * 4)  # 40 rows of D=16
        monkeypatch.setattr(bank_module, "GATHER_BLOCK", 25 * 16)
    g = store if gemm == "same" else None
    num_classes, batch, dim = 3000, 24, 16
    head = pfc_ds.PartialFC(
        pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4),
        dim,
        num_classes,
        sample_rate=rate,
        dtype=_DT[store],
        gemm_dtype=_DT.get(g),
        momentum_dtype=_DT.get(mom),
        chunk=50,
        even_batches=True,
    )
    o = pfc_ds.SparseSGD(head, 0.1, 0.9, 5e-4) if opt == "sgd" else pfc_ds.SparseAdamW(head, 1e-3)
    emb = torch.randn(batch, dim, requires_grad=True)
    for _ in range(2):
        labels = [torch.randint(0, num_classes, (batch,)) for _ in range(micro)]
        head.prefetch(labels)
        for lab in labels:
            head(emb, lab).backward()
        o.step()
        o.zero_grad()
    spec = HeadSpec(
        ids=num_classes,
        embedding_size=dim,
        sample_rate=rate,
        batch_size=batch,
        dtype=store,
        momentum_dtype=mom,
        gemm_dtype=g,
        optimizer=opt,
        chunk=50,
        grad_accum=micro,
        device="cpu",
        cpu_kernel=cpu_kernels.load() is not None,
    )
    model = head_bytes(spec)
    assert head.memory() == {k: model[k] for k in ("bank", "optimizer_state", "workspace")}


def test_backbone_terms_follow_zero_partitioning():
    kw = dict(name="tiny", embedding_size=64, image_size=56, precision="bf16", batch_size=4)
    one = {s: backbone_bytes(BackboneSpec(**kw, zero_stage=s, world_size=1)) for s in range(4)}
    four = {s: backbone_bytes(BackboneSpec(**kw, zero_stage=s, world_size=4)) for s in range(4)}
    params = sum(p.numel() for p in pfc_ds.backbones.get_backbone("tiny", 64).parameters())
    assert one[0]["params"] == 2 * params and one[0]["optimizer_state"] == 8 * params
    assert four[0] == one[0]
    assert four[1]["optimizer_state"] == one[1]["optimizer_state"] // 4
    assert four[2]["grads"] == one[2]["grads"] // 4 and four[2]["params"] == one[2]["params"]
    assert four[3]["params"] == one[3]["params"] // 4
    assert one[0]["activations"] > 0


def test_max_ids_is_the_largest_that_fits():
    head = HeadSpec(ids=1, world_size=8, embedding_size=512, sample_rate=0.1, dtype="fp16")
    budget = 30 * 1024
    top = max_ids(head, budget, device="cuda")
    at = lambda n: predict(HeadSpec(**{**head.__dict__, "ids": n}), device="cuda")["total"]  # noqa: E731
    assert at(top) <= budget < at(int(top * 1.001))
    assert max_ids(head, 2 * budget, device="cuda") > 1.9 * top


def test_model_mode_prints_prediction_and_max(capsys):
    cli.main(
        ["--model", "--ids", "1e8", "--world-size", "8", "--embedding-size", "512",
         "--dtype", "fp16", "--device", "cuda", "--device-mem-gb", "80", "--backbone", "tiny",
         "--image-size", "56", "--batch-size", "8"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "ids=100,000,000 r=0.1 W=8" in out and "GiB per rank" in out
    top = int(out.rsplit(":", 1)[1].strip().replace(",", ""))
    assert top > 100_000_000  # a 100M-id fp16 head fits 8 x 80 GB at r = 0.1


def test_fit_recovers_per_row_cost():
    recs = [
        {"sampled_rows": s, "num_local": n, "step_ms": 40.0 + 3e-3 * s}
        for s, n in [(1e4, 1e5), (5e4, 5e5), (2e5, 2e6), (1e5, 3e6)]
    ]
    f = fit_per_row(recs)
    assert f["intercept_ms"] == pytest.approx(40.0) and f["ms_per_million_rows"] == pytest.approx(
        3000
    )
    assert abs(f["ms_per_million_shard_rows_joint"]) < 1e-6 and f["r2"] == pytest.approx(1.0)


@pytest.mark.slow
def test_sweep_records_and_model_within_15_percent(tmp_path):
    """Two measured points on 2 gloo ranks: every record field, peak within 15 % of the model."""
    out = tmp_path / "scale"
    cli.main(
        ["--ids", "2e6,4e6", "--sample-rates", "0.1", "--world-size", "2", "--embedding-size",
         "128", "--dtype", "fp16", "--batch-size", "64", "--steps", "2", "--device", "cpu",
         "--output", str(out)]
    )  # fmt: skip
    records = json.loads((out / "scale.json").read_text())
    assert [r["ids"] for r in records] == [2_000_000, 4_000_000]
    for r in records:
        assert set(r) >= RECORD_FIELDS
        assert r["bank_mb"] == pytest.approx(r["ids"] / 2 * 128 * 2 / 2**20)
        assert r["predicted_mem_mb"] == pytest.approx(r["peak_mem_mb"], rel=0.15)
        assert r["step_ms"] > 0 and r["build_s"] > 0
    assert (out / "scale.png").stat().st_size > 10_000
    assert "model/measured" in (out / "scale.md").read_text()
