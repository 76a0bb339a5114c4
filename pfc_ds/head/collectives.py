"""The model-parallel head's collectives: three per head step, whatever the world size.

1. ``gather_batch``: one all-gather of every rank's embeddings with its labels' bits packed in;
2. ``gather_stats``: one all-gather of small per-row softmax statistics, combined locally;
3. ``gather_batch``'s backward: one reduce-scatter of the embedding gradient.

Uneven batches add one size exchange (``gather_sizes``). All work with or without an initialised process group (``group=None`` and no
``torch.distributed`` means a world of one), so the head runs unchanged in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pfc_ds import phases

ProcessGroup = dist.ProcessGroup | None


# torch 2.13 renamed the flat-tensor collectives (the old names warn); older torch (2.11 on the
# GPU machine) has only the old ones.
# Looked up at each call, so wrappers of ``torch.distributed`` (the profiler, the audits) see it.
def _all_gather_flat(out: torch.Tensor, t: torch.Tensor, group: ProcessGroup) -> None:
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, t, group=group)


def _reduce_scatter_flat(out: torch.Tensor, t: torch.Tensor, group: ProcessGroup) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(
        out, t, group=group
    )


def world(group: ProcessGroup) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group``; ``(1, 0)`` without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def gather_sizes(counts: list[int], device: torch.device, group: ProcessGroup) -> list[list[int]]:
    """Every rank's batch sizes (``out[rank][k]`` for its micro-batch ``k``), so uneven last
    batches need no assert (insightface #2015). One collective, and one host sync to read it."""
    size, _ = world(group)
    if size == 1:
        return [list(counts)]
    mine = torch.tensor(counts, dtype=torch.int64).to(device)
    out = torch.empty(size * len(counts), dtype=torch.int64, device=device)
    with phases.span("head/collectives"):
        _all_gather_flat(out, mine, group=group)
    flat = out.tolist()
    return [flat[r * len(counts) : (r + 1) * len(counts)] for r in range(size)]


def all_gather_no_grad(t: torch.Tensor, sizes: list[int], group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``t`` (first dims ``sizes``) along dim 0, in rank order.

    One flat all-gather (``all_gather_single``) into a flat output: with equal sizes that output already is
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
        _all_gather_flat(out, t.contiguous(), group=group)
    if all(n == longest for n in sizes):
        return out
    return torch.cat([out[r * longest : r * longest + n] for r, n in enumerate(sizes)])


def _reduce_scatter(grad: torch.Tensor, sizes: list[int], group: ProcessGroup) -> torch.Tensor:
    """This rank's rows of ``grad`` (rows of all ranks in rank order) summed over the ranks.

    One flat reduce-scatter (``reduce_scatter_single``): each rank receives only its own rows' sum, half the bytes of
    an all-reduce of the whole ``N x D``. Uneven sizes are padded to the longest first. Where
    the backend has no reduce-scatter (older gloo), one all-reduce and a slice, still one hop.
    """
    size, rank = world(group)
    longest = max(sizes)
    if any(n != longest for n in sizes):
        padded = grad.new_zeros((size * longest, *grad.shape[1:]))
        start = 0
        for r, n in enumerate(sizes):
            padded[r * longest : r * longest + n] = grad[start : start + n]
            start += n
        grad = padded
    grad = grad.contiguous()
    with phases.span("head/collectives"):
        if _REDUCE_SCATTER.get(_backend(group), True):
            out = grad.new_empty((longest, *grad.shape[1:]))
            try:
                _reduce_scatter_flat(out, grad, group=group)
                return out[: sizes[rank]]
            except (RuntimeError, NotImplementedError):  # raised before any byte moved
                _REDUCE_SCATTER[_backend(group)] = False
        dist.all_reduce(grad, group=group)
    return grad[rank * longest : rank * longest + sizes[rank]]


_REDUCE_SCATTER: dict[str, bool] = {}  # backend -> reduce_scatter_tensor works there


def _backend(group: ProcessGroup) -> str:
    return str(dist.get_backend(group))


def _pack(emb: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``(B, D [+ 2])`` fp32: the embeddings, then each int64 label's bits as two fp32 columns
    (bit-cast, not converted: labels go past 2^24, and a collective moves bytes unchanged)."""
    if labels is None:
        return emb
    bits = labels.to(torch.int64).contiguous().view(torch.float32).view(-1, 2)
    return torch.cat([emb, bits], dim=1)


def _unpack(rows: torch.Tensor, dim: int, labelled: bool):
    if not labelled:
        return rows, None
    return rows[:, :dim], rows[:, dim:].contiguous().view(torch.int64).view(-1)


class _GatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, labels, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        packed = all_gather_no_grad(_pack(emb, labels), sizes, group)
        out, gathered = _unpack(packed, emb.shape[1], labels is not None)
        if gathered is not None:
            ctx.mark_non_differentiable(gathered)
        return out, gathered

    @staticmethod
    def backward(ctx, grad, _grad_labels):
        size, _ = world(ctx.group)
        if size == 1:
            return grad, None, None, None
        return _reduce_scatter(grad, ctx.sizes, ctx.group) * size, None, None, None


def gather_batch(
    emb: torch.Tensor, labels: torch.Tensor | None, sizes: list[int], group: ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every rank's fp32 embeddings, and labels when given, in one all-gather; its backward
    is one reduce-scatter handing each rank ``W * dL/d(its rows)``.

    Every rank's loss depends on all gathered rows through its own logit block, so the true
    gradient of a row is the sum over ranks. The factor W makes a data-parallel *mean* over the
    ranks (DeepSpeed, DDP) deliver exactly ``dL/dtheta`` to the backbone. ``sizes``: every
    rank's batch size.
    """
    return _GatherBatch.apply(emb, labels, sizes, group)


def gather_stats(stats: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``(W, *stats.shape)``: every rank's (equal-shaped) per-row statistics, one all-gather."""
    size, _ = world(group)
    if size == 1:
        return stats[None]
    out = stats.new_empty((size * stats.shape[0], *stats.shape[1:]))
    with phases.span("head/collectives"):
        _all_gather_flat(out, stats.contiguous(), group=group)
    return out.view(size, *stats.shape)
