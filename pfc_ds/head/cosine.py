"""Cosine logits against sampled centre rows, with the row gradient delivered to a sink.

The rows are gathered copies, not leaves of the autograd graph: backward writes ``dL/drows``
into ``sink.grad`` (a reusable buffer) for ``SparseSGD`` and returns only ``dL/demb``. Row
norms scale the GEMM output instead of materialising normalised rows, and the backward
applies the normalisation's Jacobian in closed form:

    cos_ij = (e_i . w_j) r_j,  r_j = 1 / |w_j|
    dL/dw_j = r_j sum_i G_ij e_i - r_j^2 (sum_i G_ij cos_ij) w_j

so the step touches the ``S x D`` rows only in the two GEMMs and one fused update.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.autograd.function import once_differentiable


class GradSink(Protocol):
    grad: torch.Tensor | None

    def grad_buffer(self) -> torch.Tensor: ...


# An empty input that requires grad, so the rows get a backward even for frozen embeddings.
_ANCHOR = torch.empty(0, requires_grad=True)


class _SampledCosine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb_n, rows, inv_norm, sink, gemm_dtype, anchor):
        if gemm_dtype in (None, torch.float32):
            cos = emb_n @ rows.t()
        else:
            with torch.autocast(emb_n.device.type, dtype=gemm_dtype):
                cos = (emb_n @ rows.t()).float()
        cos.mul_(inv_norm).clamp_(-1.0, 1.0)
        ctx.save_for_backward(emb_n, cos)
        ctx.rows, ctx.inv_norm, ctx.sink = rows, inv_norm, sink
        return cos

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_cos):
        emb_n, cos = ctx.saved_tensors
        rows, inv_norm, sink = ctx.rows, ctx.inv_norm, ctx.sink
        # The clamp only trims rounding overshoot past +-1, so its gradient is taken as 1.
        # cos is not needed after this, so the product overwrites it instead of a new N x S.
        coef = cos.mul_(grad_cos).sum(dim=0).mul_(inv_norm).mul_(inv_norm).neg_()
        grad_r = grad_cos * inv_norm
        grad_emb = grad_r @ rows
        if sink.grad is None:
            out = sink.grad_buffer()
            torch.mm(grad_r.t(), emb_n, out=out)
            sink.grad = out
        else:
            sink.grad.addmm_(grad_r.t(), emb_n)
        sink.grad.addcmul_(rows, coef[:, None])
        return grad_emb, None, None, None, None, None


def sampled_cosine(
    emb_n: torch.Tensor,
    rows: torch.Tensor,
    sink: GradSink,
    gemm_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(N, S)`` fp32 cosines of unit embeddings ``emb_n`` against ``rows`` (any norm)."""
    inv_norm = rows.norm(dim=1).clamp_min_(1e-12).reciprocal_()
    return _SampledCosine.apply(emb_n, rows, inv_norm, sink, gemm_dtype, _ANCHOR)
