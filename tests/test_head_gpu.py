"""The head on CUDA (marked ``gpu``; ``tools/gpu_check.sh`` runs them; skipped without a GPU).

The same properties are audited on the CPU by tests/test_head_syncs.py and the precision and
reference tests; these confirm them where they matter.
"""

from __future__ import annotations

import pytest
import torch

import pfc_ds

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _head(device, **kw):
    margin = pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    return pfc_ds.PartialFC(margin, 64, 100_000, sample_rate=0.1, seed=3, device=device,
                            even_batches=True, **kw)  # fmt: skip


def _batch(device, n=256):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(n, 64, generator=g).to(device).requires_grad_(True)
    return emb, torch.randint(0, 100_000, (n,), generator=g).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_head_step_under_sync_debug_error(dtype):
    head = _head("cuda", dtype=dtype, gemm_dtype=None if dtype == torch.float32 else dtype)
    opt = pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    emb, labels = _batch("cuda")
    head(emb, labels).backward()  # warm-up: allocator and cuBLAS set-up may sync once
    opt.step()
    opt.zero_grad()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            head(emb, labels).backward()
            opt.has_nonfinite()
            opt.step(grad_scale=torch.tensor(1.0, device="cuda"))
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(head.weight.float()).all()


def test_fp16_gemms_match_fp32():
    emb, labels = _batch("cuda")
    a, b = _head("cuda"), _head("cuda", gemm_dtype=torch.float16)
    la, lb = a(emb, labels), b(emb, labels)
    assert abs(la.item() - lb.item()) < 2e-3 * abs(la.item())
    la.backward()
    ga = a.pending[0].grad.clone()
    emb.grad = None
    lb.backward()
    gb = b.pending[0].grad
    assert ((ga - gb).norm() / ga.norm()).item() < 1e-2


def test_head_state_moves_between_cpu_and_gpu():
    cpu, gpu = _head("cpu"), _head("cuda")
    emb, labels = _batch("cpu")
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
