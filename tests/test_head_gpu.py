"""The head on CUDA (marked ``gpu``; ``tools/gpu_check.sh`` runs them; skipped without a GPU).

The CPU tests audit the same properties with a stand-in device (``tests/test_head_syncs.py``)
and against float64 references; these confirm them where they matter: real streams, events,
pinned memory, half GEMMs with fp32 outputs, and CUDA's sync detector.
"""

from __future__ import annotations

import pytest
import torch

import pfc_ds
from pfc_ds.head.rounding import column_keys, random_bits, row_keys, step_key, stochastic_round

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _head(device, classes=100_000, rate=0.1, **kw):
    margin = pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    return pfc_ds.PartialFC(margin, 64, classes, sample_rate=rate, seed=3, device=device,
                            even_batches=True, **kw)  # fmt: skip


def _batches(device, n=256, micro=1, classes=100_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 64, generator=g).to(device).requires_grad_(True),
            torch.randint(0, classes, (n,), generator=g).to(device),
        )
        for _ in range(micro)
    ]


def _train(head, opt, steps, micro, device, classes=100_000):
    for step in range(steps):
        batches = _batches(device, micro=micro, classes=classes, seed=step)
        head.prefetch([labels for _, labels in batches])
        for emb, labels in batches:
            (head(emb, labels) / micro).backward()
        opt.step(grad_scale=torch.full((), 1.0, device=device))
        opt.zero_grad()
    head.bank.flush()


OPTIMIZERS = {
    "sgd": lambda h: pfc_ds.SparseSGD(h, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adamw": lambda h: pfc_ds.SparseAdamW(h, lr=0.01),
}


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("rate", [0.1, 0.7, 1.0])  # sparse sampler, dense sampler, whole shard
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_head_step_under_sync_debug_error(dtype, rate, opt):
    gemm = None if dtype == torch.float32 else dtype
    head = _head("cuda", rate=rate, dtype=dtype, gemm_dtype=gemm)
    o = OPTIMIZERS[opt](head)
    _train(head, o, 1, 2, "cuda")  # warm-up: allocator and cuBLAS set-up may sync once
    batches = _batches("cuda", micro=2, seed=9)
    scale = torch.full((), 1.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            head.prefetch([labels for _, labels in batches])
            for emb, labels in batches:
                (head(emb, labels) / 2).backward()
            o.has_nonfinite()
            o.step(grad_scale=scale)
            o.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(head.weight.float()).all()


@pytest.mark.parametrize("micro", [1, 2])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_host_and_disk_banks_equal_the_device_bank_on_cuda(tmp_path, dtype, opt, micro):
    """Streams, events and pinned buffers: the offloaded banks store the same bits."""
    gemm = None if dtype == torch.float32 else dtype
    states = {}
    for bank in ("device", "host", "disk"):
        head = _head("cuda", classes=20_000, dtype=dtype, gemm_dtype=gemm, bank=bank,
                     bank_path=str(tmp_path / bank))  # fmt: skip
        _train(head, OPTIMIZERS[opt](head), 4, micro, "cuda", classes=20_000)
        states[bank] = {
            k: v.cpu() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)
        }
    for bank in ("host", "disk"):
        for k, v in states["device"].items():
            assert torch.equal(states[bank][k], v), (bank, k)


def test_host_bank_is_pinned_in_place():
    head = _head("cuda", classes=20_000, dtype=torch.float16, bank="host")
    pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9)
    assert head.bank.weight.is_pinned() and head.bank.momentum.is_pinned()
    _train(head, pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9), 1, 1, "cuda", classes=20_000)
    assert all(b.is_pinned() for b in head.bank._pool._free)


def test_rounding_bits_are_the_same_on_cpu_and_cuda():
    key = step_key(5, 17, 2)
    rows = torch.randint(0, 2**40, (300,))
    cpu = random_bits(row_keys(rows, key), column_keys(77, torch.device("cpu")), 13,
                      torch.empty(300, 77, dtype=torch.int32))  # fmt: skip
    dev = torch.device("cuda")
    gpu = random_bits(row_keys(rows.to(dev), key), column_keys(77, dev), 13,
                      torch.empty(300, 77, dtype=torch.int32, device=dev))  # fmt: skip
    assert torch.equal(cpu, gpu.cpu())
    x = torch.randn(300, 77) * 0.1
    for dtype in (torch.float16, torch.bfloat16):
        a = stochastic_round(x, rows, key, torch.empty(300, 77, dtype=dtype))
        b = stochastic_round(
            x.to(dev), rows.to(dev), key, torch.empty(300, 77, dtype=dtype, device=dev)
        )
        assert torch.equal(a, b.cpu())


def test_half_gemms_return_fp32_and_match_fp32():
    from pfc_ds.head import margin_softmax

    emb, labels = _batches("cuda")[0]
    a, b = _head("cuda"), _head("cuda", gemm_dtype=torch.float16)
    la, lb = a(emb, labels), b(emb, labels)
    assert margin_softmax._OUT_DTYPE.get("cuda", True)  # torch.mm(..., out_dtype=fp32) ran
    assert abs(la.item() - lb.item()) < 2e-3 * abs(la.item())
    la.backward()
    ga = a.window.row_grad()
    emb.grad = None
    lb.backward()
    gb = b.window.row_grad()
    assert ((ga - gb).norm() / ga.norm()).item() < 1e-2


@pytest.mark.parametrize("batch", [128, 512])
def test_fp16_gemms_finite_at_loss_scale_2_16(batch):
    emb, labels = _batches("cuda", n=batch)[0]
    head = _head("cuda", dtype=torch.float16, gemm_dtype=torch.float16)
    opt = pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9)
    (head(emb, labels) * 2.0**16).backward()
    assert torch.isfinite(emb.grad).all()
    assert bool(opt.step(grad_scale=2.0**16))


def test_norms_keep_half_activations_on_cuda():
    from pfc_ds.backbones.norms import BatchNorm2d, LayerNorm

    x = torch.randn(8, 16, 14, 14, device="cuda")
    for layer, inp in ((BatchNorm2d(16), x), (LayerNorm(14), x)):
        ref = layer.cuda()(inp)
        layer.half()
        saved: list[torch.Tensor] = []

        def keep(t, saved=saved):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = layer(inp.half().requires_grad_(True))
        assert out.dtype == torch.float16
        assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 5e-3
        big = [t for t in saved if t.numel() == inp.numel()]
        assert big and all(t.dtype == torch.float16 for t in big)  # no fp32 copy kept


def test_head_state_moves_between_cpu_and_gpu():
    cpu, gpu = _head("cpu"), _head("cuda")
    emb, labels = _batches("cpu")[0]
    pfc_ds.SparseSGD(cpu, lr=0.1, momentum=0.9)
    cpu(emb, labels).backward()
    gpu.load_state_dict({k: v for k, v in cpu.state_dict().items()})
    assert torch.equal(gpu.weight.cpu(), cpu.weight)
    back = _head("cpu")
    back.load_state_dict(gpu.state_dict())
    assert torch.equal(back.weight, cpu.weight)
    assert torch.equal(back.sampler.state(), cpu.sampler.state())
    moved = _head("cpu").to("cuda")
    assert moved.weight.device.type == "cuda"
