"""Collectives the model-parallel head needs, as autograd Functions.

Both work with or without an initialised process group (``group=None`` and no
``torch.distributed`` means a world of one), so the head runs unchanged in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

ProcessGroup = dist.ProcessGroup | None


def world(group: ProcessGroup) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group``; ``(1, 0)`` without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup) -> torch.Tensor:
    if world(group)[0] > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def gather_sizes(n: int, device: torch.device, group: ProcessGroup) -> list[int]:
    """Every rank's batch size, so uneven last batches need no assert (insightface #2015)."""
    size, _ = world(group)
    if size == 1:
        return [n]
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


def _gather_uneven(t: torch.Tensor, sizes: list[int], group: ProcessGroup) -> torch.Tensor:
    size, _ = world(group)
    if size == 1:
        return t
    longest = max(sizes)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def all_gather_no_grad(t: torch.Tensor, sizes: list[int], group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``t`` (first dims ``sizes``) along dim 0, in rank order."""
    return _gather_uneven(t, sizes, group)


class _AllGatherScaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, sizes: list[int], group: ProcessGroup) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        return _gather_uneven(t, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size, rank = world(ctx.group)
        grad = _all_reduce(grad.contiguous(), dist.ReduceOp.SUM, ctx.group)
        start = sum(ctx.sizes[:rank])
        return grad[start : start + ctx.sizes[rank]] * size, None, None


def all_gather_with_grad(t: torch.Tensor, sizes: list[int], group: ProcessGroup) -> torch.Tensor:
    """All-gather whose backward hands each rank ``W * dL/d(its rows)``.

    Every rank's loss depends on all gathered rows through its own logit block, so the true
    gradient of a row is the sum over ranks. The factor W makes a data-parallel *mean* over the
    ranks (DeepSpeed, DDP) deliver exactly ``dL/dθ`` to the backbone.
    """
    return _AllGatherScaled.apply(t, sizes, group)


class _DistSoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group: ProcessGroup):
        rows = torch.nonzero(labels != -1).squeeze(1)
        cols = labels[rows]
        row_max = _all_reduce(logits.max(dim=1).values, dist.ReduceOp.MAX, group)
        exp = (logits - row_max[:, None]).exp_()
        sum_exp = _all_reduce(exp.sum(dim=1), dist.ReduceOp.SUM, group)
        target = logits.new_zeros(logits.shape[0])
        target[rows] = logits[rows, cols]
        target = _all_reduce(target, dist.ReduceOp.SUM, group)
        loss = (torch.log(sum_exp) + row_max - target).mean()
        exp.div_(sum_exp[:, None])
        ctx.save_for_backward(exp, rows, cols)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        # The saved softmax becomes the gradient in place: no second N x S buffer.
        grad, rows, cols = ctx.saved_tensors
        grad[rows, cols] -= 1.0
        grad.mul_(grad_loss / grad.shape[0])
        return grad, None, None


def dist_softmax_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, group: ProcessGroup
) -> torch.Tensor:
    """Mean softmax cross-entropy when the class dimension is split across ranks.

    ``logits``: ``(N, S_local)`` fp32 over the global batch; ``labels``: local column or -1.
    Max, sum-exp and the target logit are all-reduced, so the loss is identical on every rank.
    """
    return _DistSoftmaxCrossEntropy.apply(logits, labels, group)
