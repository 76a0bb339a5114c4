"""Collectives the model-parallel head needs, as autograd Functions.

Both work with or without an initialised process group (``group=None`` and no
``torch.distributed`` means a world of one), so the head runs unchanged in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pfc_ds import phases

ProcessGroup = dist.ProcessGroup | None


def world(group: ProcessGroup) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group``; ``(1, 0)`` without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup) -> torch.Tensor:
    """In-place all-reduce of ``t`` (a no-op in a world of one); returns ``t``."""
    if world(group)[0] > 1:
        with phases.span("head/collectives"):
            dist.all_reduce(t, op=op, group=group)
    return t


def gather_sizes(counts: list[int], device: torch.device, group: ProcessGroup) -> list[list[int]]:
    """Every rank's batch sizes (``out[rank][k]`` for its micro-batch ``k``), so uneven last
    batches need no assert (insightface #2015). One collective, and one host sync to read it."""
    size, _ = world(group)
    if size == 1:
        return [list(counts)]
    mine = torch.tensor(counts, dtype=torch.int64).to(device)
    out = torch.empty(size * len(counts), dtype=torch.int64, device=device)
    with phases.span("head/collectives"):
        dist.all_gather_into_tensor(out, mine, group=group)
    flat = out.tolist()
    return [flat[r * len(counts) : (r + 1) * len(counts)] for r in range(size)]


def all_gather_no_grad(t: torch.Tensor, sizes: list[int], group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``t`` (first dims ``sizes``) along dim 0, in rank order.

    One ``all_gather_into_tensor`` into a flat output: with equal sizes that output already is
    the concatenation; uneven ones are padded to the longest and cut out of it.
    """
    size, _ = world(group)
    if size == 1:
        return t
    longest = max(sizes)
    if t.shape[0] != longest:
        padded = t.new_zeros((longest, *t.shape[1:]))
        padded[: t.shape[0]] = t
        t = padded
    out = t.new_empty((size * longest, *t.shape[1:]))
    with phases.span("head/collectives"):
        dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    if all(n == longest for n in sizes):
        return out
    return torch.cat([out[r * longest : r * longest + n] for r, n in enumerate(sizes)])


class _AllGatherScaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, sizes: list[int], group: ProcessGroup) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        return all_gather_no_grad(t, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size, rank = world(ctx.group)
        grad = all_reduce(grad.contiguous(), dist.ReduceOp.SUM, ctx.group)
        start = sum(ctx.sizes[:rank])
        return grad[start : start + ctx.sizes[rank]] * size, None, None


def all_gather_with_grad(t: torch.Tensor, sizes: list[int], group: ProcessGroup) -> torch.Tensor:
    """All-gather whose backward hands each rank ``W * dL/d(its rows)``.

    Every rank's loss depends on all gathered rows through its own logit block, so the true
    gradient of a row is the sum over ranks. The factor W makes a data-parallel *mean* over the
    ranks (DeepSpeed, DDP) deliver exactly ``dL/dθ`` to the backbone.
    """
    return _AllGatherScaled.apply(t, sizes, group)
