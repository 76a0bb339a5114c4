"""Margin-softmax cross-entropy against sampled centre rows, streamed over column chunks.

The ``N x S`` logits are never held. Forward runs over chunks of the sampled rows with an online
max and sum-exp, then combines the ranks' partial results (all-reduce MAX, then SUM); backward
recomputes each chunk's cosines and turns them into that chunk's gradients straight away. Peak
memory is two ``N x chunk`` blocks beside the ``S x D`` rows and their gradient.

Only the margin is differentiated by autograd, on the ``N`` target cosines, so ArcFace's
gradient stays exact whatever ``CombinedMarginLoss`` computes. The rows are gathered copies:
backward writes ``dL/drows`` into ``sink.grad`` (for the sparse optimizer) and returns only
``dL/demb``. Row norms scale the GEMM output instead of normalising the rows, and the
normalisation's Jacobian is applied in closed form:

    cos_ij = (e_i . w_j) r_j,   r_j = 1 / |w_j|
    dL/de_i = sum_j G_ij r_j w_j
    dL/dw_j = r_j sum_i G_ij e_i - r_j^2 (sum_i G_ij cos_ij) w_j

All three GEMMs take ``gemm_dtype`` inputs (fp16/bf16 halve their time on a GPU) and produce
fp32. Nothing here reads a value back to the host.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from pfc_ds import phases
from pfc_ds.head.collectives import ProcessGroup, all_reduce
from pfc_ds.head.margins import CombinedMarginLoss
from pfc_ds.head.workspace import Workspace

# Bytes of one N x chunk fp32 block when the chunk is chosen automatically.
DEFAULT_CHUNK_BYTES = 64 << 20
_MIN_CHUNK = 256
# A finite "minus infinity" for the running max: exp(-inf - _FLOOR) is 0 and never NaN.
_FLOOR = -1e30


class GradSink(Protocol):
    grad: torch.Tensor | None

    def grad_buffer(self) -> torch.Tensor: ...

    def current_rows(self) -> torch.Tensor: ...


def chunk_size(batch: int, num_sample: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Columns per chunk so one ``batch x chunk`` fp32 block fits ``budget_bytes``."""
    cols = max(_MIN_CHUNK, budget_bytes // (4 * max(batch, 1)))
    return max(1, min(num_sample, cols))


class _Chunks:
    """What forward and backward share: inputs, the chunk loop and one chunk's logits."""

    def __init__(self, emb, rows, inv_norm, target, active, margin, gemm_dtype, chunk, ws):
        self.emb = emb if gemm_dtype is None else emb.to(gemm_dtype)
        self.rows, self.inv_norm, self.target = rows, inv_norm, target
        self.active, self.margin, self.gemm_dtype = active, margin, gemm_dtype
        self.chunk, self.ws = chunk, ws
        self.has = target >= 0

    def ranges(self):
        s = self.rows.shape[0]
        for c0 in range(0, s, self.chunk):
            yield c0, min(s, c0 + self.chunk)

    def rows_of(self, c0: int, c1: int) -> torch.Tensor:
        r = self.rows[c0:c1]
        return r if self.gemm_dtype is None or r.dtype == self.gemm_dtype else r.to(self.gemm_dtype)

    def cosine(self, c0: int, c1: int, name: str) -> torch.Tensor:
        """``(N, c1 - c0)`` fp32 cosines in workspace buffer ``name``."""
        out = self.ws.get(name, (self.emb.shape[0], c1 - c0), torch.float32)
        r = self.rows_of(c0, c1)
        with phases.span("head/gemm"):
            if self.emb.dtype == torch.float32 and r.dtype == torch.float32:
                torch.mm(self.emb, r.t(), out=out)
            else:
                out.copy_(self.emb @ r.t())
        return out.mul_(self.inv_norm[c0:c1]).clamp_(-1.0, 1.0)

    def target_cols(self, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's target column inside this chunk (clamped) and whether it is inside."""
        col = self.target - c0
        inside = self.has & (col >= 0) & (col < c1 - c0)
        return col.clamp(0, c1 - c0 - 1)[:, None], inside[:, None]

    def logits(self, cos: torch.Tensor, c0: int, c1: int, t_logit: torch.Tensor):
        """Scale ``cos`` in place into margin logits; returns them and the filter mask."""
        col, inside = self.target_cols(c0, c1)
        dirty = None
        thr = self.margin.interclass_filtering_threshold
        if thr > 0.0:
            dirty = cos > thr
            dirty.scatter_(1, col, dirty.gather(1, col) & ~inside)  # targets are never filtered
        logits = cos.mul_(self.margin.s)
        if dirty is not None:
            logits.masked_fill_(dirty, 0.0)
        logits.scatter_(1, col, torch.where(inside, t_logit[:, None], logits.gather(1, col)))
        if self.active is not None:
            logits.masked_fill_(~self.active[c0:c1], float("-inf"))
        return logits, dirty

    def target_cosine(self) -> torch.Tensor:
        """``(N,)`` cosine of each row's target column (0 where another rank owns it)."""
        col = self.target.clamp(min=0)
        r = self.rows.index_select(0, col)
        if self.gemm_dtype is not None:
            r = r.to(self.gemm_dtype)
        dot = (self.emb.float() * r.float()).sum(dim=1)
        return (dot * self.inv_norm[col]).clamp_(-1.0, 1.0)


class _ChunkedMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, rows, inv_norm, target, active, margin, group, sink, opts, anchor):
        gemm_dtype, chunk, ws = opts
        c = _Chunks(emb, rows, inv_norm, target, active, margin, gemm_dtype, chunk, ws)
        with torch.enable_grad():
            t = c.target_cosine().detach().requires_grad_(True)
            t_margin = margin.target_logit(t)
            (d_margin,) = torch.autograd.grad(t_margin.sum(), t)  # elementwise: its diagonal
        t_logit = torch.where(c.has, t_margin.detach() * margin.s, 0.0)

        n = emb.shape[0]
        run_max = torch.full((n,), _FLOOR, device=emb.device)
        run_sum = torch.zeros(n, device=emb.device)
        for c0, c1 in c.ranges():
            cos = c.cosine(c0, c1, "block")
            g = ws.get("block_grad", tuple(cos.shape), torch.float32).copy_(cos)
            logits, _ = c.logits(g, c0, c1, t_logit)
            new_max = torch.maximum(run_max, logits.max(dim=1).values)
            run_sum.mul_(torch.exp(run_max - new_max))
            run_sum.add_(logits.sub_(new_max[:, None]).exp_().sum(dim=1))
            run_max = new_max
        row_max = all_reduce(run_max.clone(), dist.ReduceOp.MAX, group)
        sum_exp = all_reduce(run_sum.mul_(torch.exp(run_max - row_max)), dist.ReduceOp.SUM, group)
        t_logit = all_reduce(t_logit, dist.ReduceOp.SUM, group)
        loss = (torch.log(sum_exp) + row_max - t_logit).mean()

        ctx.save_for_backward(emb, inv_norm, target, row_max, sum_exp, t_logit, d_margin)
        ctx.active, ctx.margin, ctx.sink, ctx.opts = active, margin, sink, opts
        # One chunk: backward reuses its cosines unless another forward took the buffer since.
        ctx.kept = ws.uses("block") if chunk >= rows.shape[0] else None
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        emb, inv_norm, target, row_max, sum_exp, t_logit, d_margin = ctx.saved_tensors
        gemm_dtype, chunk, ws = ctx.opts
        rows = ctx.sink.current_rows()  # the shared row buffer may have served a later forward
        c = _Chunks(emb, rows, inv_norm, target, ctx.active, ctx.margin, gemm_dtype, chunk, ws)
        s, n = ctx.margin.s, emb.shape[0]
        sink = ctx.sink
        grad_rows = sink.grad_buffer() if sink.grad is None else sink.grad
        fresh = sink.grad is None
        grad_emb = torch.zeros(n, emb.shape[1], device=emb.device)
        inv_sum = sum_exp.reciprocal()
        for c0, c1 in c.ranges():
            if ctx.kept is not None and ws.uses("block") == ctx.kept:
                cos = ws.get("block", (n, c1 - c0), torch.float32)  # forward's, intact
            else:
                cos = c.cosine(c0, c1, "block")
            g = ws.get("block_grad", tuple(cos.shape), torch.float32).copy_(cos)
            logits, dirty = c.logits(g, c0, c1, t_logit)
            # dL/dlogit = (softmax - onehot) * grad / N, then dL/dcos = s * that, times the
            # margin's derivative on the target column; filtered entries get none.
            probs = logits.sub_(row_max[:, None]).exp_().mul_(inv_sum[:, None])
            col, inside = c.target_cols(c0, c1)
            picked = probs.gather(1, col)
            probs.scatter_(1, col, torch.where(inside, (picked - 1.0) * d_margin[:, None], picked))
            dcos = probs.mul_(grad_loss * (s / n))
            if dirty is not None:
                dcos.masked_fill_(dirty, 0.0)
            r = inv_norm[c0:c1]
            coef = cos.mul_(dcos).sum(dim=0).mul_(r).mul_(r).neg_()
            grad_r = dcos.mul_(r)
            rows_c = c.rows_of(c0, c1)
            gr = grad_r if gemm_dtype is None else grad_r.to(gemm_dtype)
            block = grad_rows[c0:c1]
            with phases.span("head/gemm"):
                grad_emb.add_(gr @ rows_c)
                if gr.dtype != torch.float32:  # half GEMM inputs, fp32 sink
                    block.copy_(gr.t() @ c.emb) if fresh else block.add_(gr.t() @ c.emb)
                elif fresh:
                    torch.mm(gr.t(), c.emb, out=block)  # into the sink: no S x D temporary
                else:
                    block.addmm_(gr.t(), c.emb)
            block.addcmul_(rows[c0:c1], coef[:, None])
        sink.grad = grad_rows
        return grad_emb, None, None, None, None, None, None, None, None, None


# An empty input that requires grad, so the rows get a backward even for frozen embeddings.
_ANCHOR = torch.empty(0, requires_grad=True)


def margin_softmax_cross_entropy(
    emb: torch.Tensor,
    rows: torch.Tensor,
    target: torch.Tensor,
    margin: CombinedMarginLoss,
    group: ProcessGroup,
    sink: GradSink,
    *,
    active: torch.Tensor | None = None,
    gemm_dtype: torch.dtype | None = None,
    chunk: int | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Mean margin-softmax cross-entropy of the global batch, identical on every rank.

    ``emb``: ``(N, D)`` unit embeddings of the global batch (fp32); ``rows``: this rank's ``S``
    sampled centres (any norm, fp32 or the GEMM dtype); ``target``: each row's column in
    ``rows`` or -1 when another rank owns it; ``active``: columns in the loss (``None``: all).
    ``dL/drows`` goes to ``sink.grad`` in backward.
    """
    inv_norm = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
    inv_norm = inv_norm.clamp_min_(1e-12).reciprocal_()
    if chunk is None:
        chunk = chunk_size(emb.shape[0], rows.shape[0])
    ws = workspace or Workspace(emb.device)
    opts = (None if gemm_dtype == torch.float32 else gemm_dtype, max(1, chunk), ws)
    return _ChunkedMarginCE.apply(
        emb, rows, inv_norm, target, active, margin, group, sink, opts, _ANCHOR
    )
