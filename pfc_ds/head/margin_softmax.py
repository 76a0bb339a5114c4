"""Margin softmax cross-entropy over a class dimension split across ranks, as one autograd step.

Mathematically ``dist_cross_entropy(margin(cos, labels), labels)``, but fused so the ``N x S``
logits live in one reused buffer: scaled, exponentiated and normalised in place in forward, and
turned into the gradient in place in backward. Only the margin itself is differentiated by
autograd, on the ``N`` target cosines, so its gradient stays exact (ArcFace through
``arccos``/``cos``) whatever ``CombinedMarginLoss`` computes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from pfc_ds.head.collectives import ProcessGroup, all_reduce
from pfc_ds.head.margins import CombinedMarginLoss


class _MarginSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cos, labels, margin: CombinedMarginLoss, group, buffer):
        rows = torch.nonzero(labels != -1).squeeze(1)
        cols = labels[rows]
        with torch.enable_grad():
            t = cos[rows, cols].detach().requires_grad_(True)
            t_margin = margin.target_logit(t)
            (d_margin,) = torch.autograd.grad(t_margin.sum(), t)  # elementwise map: its diagonal
        s = margin.s
        logits = torch.mul(cos, s, out=buffer)
        dirty = margin.filter_mask(cos, rows, cols)
        if dirty is not None:
            logits.masked_fill_(dirty, 0.0)
        target = logits.new_zeros(logits.shape[0])
        target[rows] = t_margin.detach() * s
        logits[rows, cols] = target[rows]

        row_max = all_reduce(logits.max(dim=1).values, dist.ReduceOp.MAX, group)
        probs = logits.sub_(row_max[:, None]).exp_()
        sum_exp = all_reduce(probs.sum(dim=1), dist.ReduceOp.SUM, group)
        target = all_reduce(target, dist.ReduceOp.SUM, group)
        loss = (torch.log(sum_exp) + row_max - target).mean()
        probs.div_(sum_exp[:, None])
        ctx.save_for_backward(probs, rows, cols, d_margin, dirty)
        ctx.s = s
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad, rows, cols, d_margin, dirty = ctx.saved_tensors
        grad[rows, cols] -= 1.0
        grad.mul_(grad_loss * ctx.s / grad.shape[0])
        if dirty is not None:
            grad.masked_fill_(dirty, 0.0)
        grad[rows, cols] *= d_margin
        return grad, None, None, None, None


def margin_softmax_cross_entropy(
    cos: torch.Tensor,
    labels: torch.Tensor,
    margin: CombinedMarginLoss,
    group: ProcessGroup,
    buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean margin-softmax cross-entropy of the global batch, identical on every rank.

    ``cos``: ``(N, S_local)`` fp32 cosines over the global batch; ``labels``: the local column of
    each row's target, or -1 when another rank owns it. Max, sum-exp and the target logit are
    all-reduced. ``buffer`` (``N x S_local`` fp32) is overwritten and becomes ``dL/dcos``.
    """
    if buffer is None:
        buffer = torch.empty_like(cos)
    return _MarginSoftmaxCE.apply(cos, labels, margin, group, buffer)
