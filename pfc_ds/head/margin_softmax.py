"""Margin-softmax cross-entropy against sampled centre rows, streamed over column chunks.

The ``N x S`` logits are never held. Forward runs over chunks of the sampled rows with an online
max and sum-exp, then combines the ranks' partial results locally from one all-gather of each
rank's ``(max, sum-exp, target logit)`` per row; backward
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

The first term is a GEMM into ``sink.grad``; the second, a per-row coefficient times the row,
is left to the optimizer as ``sink.coef`` (its own pass over the rows applies it for free).

All three GEMMs take ``gemm_dtype`` inputs (fp16/bf16 halve their time on a GPU), accumulate
in fp32 and return fp32 (``torch.mm(..., out_dtype=float32)`` on a GPU; a CPU has no such
kernel and multiplies the half-rounded operands in fp32, the same arithmetic). Row norms are
applied to the fp32 outputs, so cosines stay fp32 (bf16 cosines would be quantised to about
0.4%, ±0.25 logit at s=64). The backward's half operand ``G r`` carries the loss scale (2^16 at
DeepSpeed's default) times ``s / N`` times ``1/|w|``: it is scaled by a power of two to at most
2^14 before the cast and the GEMMs' fp32 outputs are scaled back, so it can neither overflow
fp16 nor lose its small probabilities to underflow, at any loss scale or batch size. Nothing
here reads a value back to the host.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.autograd.function import once_differentiable
from torch.autograd.graph import increment_version

from pfc_ds import phases
from pfc_ds.head import cpu_kernels
from pfc_ds.head.adaface import AdaFace
from pfc_ds.head.collectives import ProcessGroup, gather_stats
from pfc_ds.head.margins import CombinedMarginLoss
from pfc_ds.head.workspace import Workspace

# Bytes of one N x chunk fp32 block when the chunk is chosen automatically.
DEFAULT_CHUNK_BYTES = 64 << 20
_MIN_CHUNK = 256
# A finite "minus infinity" for the running max: exp(-inf - _FLOOR) is 0 and never NaN.
_FLOOR = -1e30
# The backward's half-precision GEMM operand is scaled to at most this magnitude (fp16's largest
# finite value is 65504; the headroom keeps the cast of a rounded-up value finite).
_HALF_LIMIT = 2.0**14
_OUT_DTYPE: dict[str, bool] = {}  # device type -> torch.mm(..., out_dtype=fp32) works there
_NO_MASK = torch.empty(0, dtype=torch.bool)  # the kernels' "every column is in the loss"


def _kernels(emb: torch.Tensor):
    """The compiled per-chunk passes for CPU tensors (``cpu_kernels``), else ``None``: eager."""
    return cpu_kernels.load() if cpu_kernels.usable(emb) else None


def _mm32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` accumulated in fp32 with an fp32 result, for fp32 or equal half inputs."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
    kind = a.device.type
    if _OUT_DTYPE.get(kind, True):
        try:
            if out is not None:
                return torch.mm(a, b, out_dtype=torch.float32, out=out)
            return torch.mm(a, b, out_dtype=torch.float32)
        except (NotImplementedError, RuntimeError, TypeError):
            _OUT_DTYPE[kind] = False  # no such kernel here: multiply the half values in fp32
    r = torch.mm(a.float(), b.float())
    return r if out is None else out.copy_(r)


def _pow2_scale(x: torch.Tensor) -> torch.Tensor:
    """0-dim fp32 power of two bringing ``max |x|`` to at most ``_HALF_LIMIT`` (and an all-zero
    ``x`` to a harmless 2^30): exact to apply and to undo."""
    amax = x.abs().amax().clamp_min_(2.0**-100)
    return torch.exp2(torch.floor(torch.log2(_HALF_LIMIT / amax))).clamp_(2.0**-30, 2.0**30)


class GradSink(Protocol):
    """Where backward leaves ``dL/drows = grad + coef[:, None] * rows``: the GEMM part ``grad``
    (``S x D``) and the normalisation's per-row coefficient ``coef`` (``S``), kept apart so the
    optimizer folds ``coef`` into its own pass over the rows instead of backward spending an
    extra ``S x D`` pass (the rows are the same for every micro-batch of a window, so the
    coefficients of several backwards simply add)."""

    grad: torch.Tensor | None
    coef: torch.Tensor | None
    bound: torch.Tensor | None  # 0-dim: an upper bound on |grad| (inf/NaN: not finite)
    bound_at: tuple[int, int]  # (grad, coef) versions the bound was left at
    open: bool

    def grad_buffer(self) -> torch.Tensor: ...

    def coef_buffer(self) -> torch.Tensor: ...

    def current_rows(self) -> torch.Tensor: ...


def chunk_size(batch: int, num_sample: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Columns per chunk so one ``batch x chunk`` fp32 block fits ``budget_bytes``."""
    cols = max(_MIN_CHUNK, budget_bytes // (4 * max(batch, 1)))
    return max(1, min(num_sample, cols))


class _Chunks:
    """What forward and backward share: inputs, the chunk loop and one chunk's logits.

    GEMM operands are ``gemm_dtype`` on a GPU; on a CPU, which has no fp32-output half GEMM,
    they are rounded to ``gemm_dtype`` and kept in fp32, so both compute the same products.
    """

    def __init__(self, emb, rows, inv_norm, target, active, margin, gemm_dtype, chunk, ws):
        self.gemm_dtype = gemm_dtype
        self.half_in_fp32 = gemm_dtype is not None and emb.device.type == "cpu"
        self.emb = self.operand(emb)
        self.rows, self.inv_norm, self.target = rows, inv_norm, target
        self.active, self.margin = active, margin
        self.chunk, self.ws = chunk, ws
        self.has = target >= 0

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a GEMM operand: in ``gemm_dtype``, or rounded to it and fp32 on a CPU."""
        if self.gemm_dtype is None:
            return x
        if self.half_in_fp32:
            return x.to(self.gemm_dtype).float()
        return x if x.dtype == self.gemm_dtype else x.to(self.gemm_dtype)

    def ranges(self):
        s = self.rows.shape[0]
        for c0 in range(0, s, self.chunk):
            yield c0, min(s, c0 + self.chunk)

    def rows_of(self, c0: int, c1: int) -> torch.Tensor:
        return self.operand(self.rows[c0:c1])

    def dots(self, c0: int, c1: int, name: str) -> torch.Tensor:
        """``(N, c1 - c0)`` fp32 dot products ``e_i . w_j`` in workspace buffer ``name``."""
        out = self.ws.get(name, (self.emb.shape[0], c1 - c0), torch.float32)
        with phases.span("head/gemm"):
            return _mm32(self.emb, self.rows_of(c0, c1).t(), out=out)

    def cosine(self, c0: int, c1: int, name: str) -> torch.Tensor:
        """``(N, c1 - c0)`` fp32 cosines in workspace buffer ``name``."""
        bound = self.margin.cos_bound
        return self.dots(c0, c1, name).mul_(self.inv_norm[c0:c1]).clamp_(-bound, bound)

    def active_of(self, c0: int, c1: int) -> torch.Tensor:
        """The chunk's column mask for the kernels (empty: all columns)."""
        return _NO_MASK if self.active is None else self.active[c0:c1]

    def clamped(self, cos: torch.Tensor, c0: int, c1: int) -> torch.Tensor | None:
        """Where a non-target cosine sits on a clamp bound below 1 (AdaFace's 1 - 1e-3): its
        gradient is zero, as autograd through the clamp gives. ``None`` for a bound of 1 (no
        cost for ArcFace/CosFace). Targets are left to the margin's own derivative."""
        bound = self.margin.cos_bound
        if bound >= 1.0:
            return None
        mask = cos.abs() >= bound
        col, inside = self.target_cols(c0, c1)
        return mask.scatter_(1, col, mask.gather(1, col) & ~inside)

    def target_cols(self, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's target column inside this chunk (clamped) and whether it is inside."""
        col = self.target - c0
        inside = self.has & (col >= 0) & (col < c1 - c0)
        return col.clamp(0, c1 - c0 - 1)[:, None], inside[:, None]

    def logits(self, cos: torch.Tensor, c0: int, c1: int, t_logit: torch.Tensor):
        """Margin logits of the chunk's cosines in the ``block_grad`` buffer (``cos`` itself
        is kept for backward); returns them and the filter mask."""
        col, inside = self.target_cols(c0, c1)
        dirty = None
        thr = self.margin.interclass_filtering_threshold
        if thr > 0.0:
            dirty = cos > thr
            dirty.scatter_(1, col, dirty.gather(1, col) & ~inside)  # targets are never filtered
        out = self.ws.get("block_grad", tuple(cos.shape), torch.float32)
        logits = torch.mul(cos, self.margin.s, out=out)  # scaled while copied: one pass
        if dirty is not None:
            logits.masked_fill_(dirty, 0.0)
        logits.scatter_(1, col, torch.where(inside, t_logit[:, None], logits.gather(1, col)))
        if self.active is not None:
            logits.masked_fill_(~self.active[c0:c1], float("-inf"))
        return logits, dirty

    def target_cosine(self) -> torch.Tensor:
        """``(N,)`` cosine of each row's target column (0 where another rank owns it)."""
        col = self.target.clamp(min=0)
        r = self.operand(self.rows.index_select(0, col))
        dot = (self.emb.float() * r.float()).sum(dim=1)
        return (dot * self.inv_norm[col]).clamp_(-1.0, 1.0)

    def backward_gemms(
        self, grad_r: torch.Tensor, c0: int, c1: int, grad_emb: torch.Tensor, block: torch.Tensor,
        fresh: bool,
    ) -> None:  # fmt: skip
        """``grad_emb += grad_r @ rows`` and ``block (=|+=) grad_r^T @ emb`` for ``grad_r`` =
        ``dL/dcos * r`` of this chunk, through half operands scaled by a power of two."""
        rows_c = self.rows_of(c0, c1)
        if self.gemm_dtype is None:
            grad_emb.addmm_(grad_r, rows_c)
            if fresh:
                torch.mm(grad_r.t(), self.emb, out=block)  # into the sink: no S x D temporary
            else:
                block.addmm_(grad_r.t(), self.emb)
            return
        f = _pow2_scale(grad_r)
        half = self.ws.get("block_half", tuple(grad_r.shape), self.gemm_dtype)
        gr = self.operand(torch.mul(grad_r, f, out=half))
        grad_emb.addcdiv_(_mm32(gr, rows_c), f)
        rows_grad = _mm32(gr.t(), self.emb)
        if fresh:
            torch.div(rows_grad, f, out=block)
        else:
            block.addcdiv_(rows_grad, f)


def _combine(run_max, run_sum, t_logit, group):
    """Global ``(row_max, sum_exp, target_logit)`` per row from every rank's partial ones, in
    one all-gather of an ``(N, 3)`` fp32 block. Every rank combines the same gathered numbers
    in the same order, so the loss is bit-identical on all of them."""
    parts = gather_stats(torch.stack([run_max, run_sum, t_logit], dim=1), group)
    if parts.shape[0] == 1:
        return run_max, run_sum, t_logit
    maxes, sums, targets = parts.unbind(dim=2)  # each (W, N)
    row_max = maxes.amax(dim=0)
    sum_exp = (sums * torch.exp(maxes - row_max)).sum(dim=0)
    return row_max, sum_exp, targets.sum(dim=0)


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
        kernels = _kernels(emb)
        for c0, c1 in c.ranges():
            if kernels is not None:  # one pass: cosines in place, running max and sum-exp
                kernels.margin_forward(
                    c.dots(c0, c1, "block"), inv_norm[c0:c1], target, c0, c.active_of(c0, c1),
                    t_logit, run_max, run_sum, margin.s, margin.cos_bound,
                    margin.interclass_filtering_threshold,
                )  # fmt: skip
                continue
            cos = c.cosine(c0, c1, "block")
            logits, _ = c.logits(cos, c0, c1, t_logit)
            new_max = torch.maximum(run_max, logits.max(dim=1).values)
            run_sum.mul_(torch.exp(run_max - new_max))
            run_sum.add_(logits.sub_(new_max[:, None]).exp_().sum(dim=1))
            run_max = new_max
        row_max, sum_exp, t_logit = _combine(run_max, run_sum, t_logit, group)
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
        if not ctx.sink.open:
            raise RuntimeError(
                "PartialFC: backward of a forward whose rows the head has dropped (a later "
                "forward sampled anew, or the optimizer stepped): for gradient accumulation "
                "call head.prefetch([labels of each micro-batch]) at the start of the window"
            )
        gemm_dtype, chunk, ws = ctx.opts
        rows = ctx.sink.current_rows()  # the shared row buffer may have served a later forward
        c = _Chunks(emb, rows, inv_norm, target, ctx.active, ctx.margin, gemm_dtype, chunk, ws)
        s, n = ctx.margin.s, emb.shape[0]
        sink = ctx.sink
        grad_rows = sink.grad_buffer() if sink.grad is None else sink.grad
        fresh = sink.grad is None
        coefs = sink.coef_buffer() if fresh else sink.coef
        grad_emb = torch.zeros(n, emb.shape[1], device=emb.device)
        lse = torch.log(sum_exp).add_(row_max)  # softmax = exp(logit - lse): one pass
        step = grad_loss * (s / n)
        kernels = _kernels(emb)
        if kernels is not None:  # N-vectors as the kernel reads them (d_margin may be expanded)
            d_margin, t_logit, lse = (x.float().contiguous() for x in (d_margin, t_logit, lse))
        # max |dL/dcos * r| over the chunks: bounds |dL/drows| (Window.grad_is_finite)
        amax = torch.zeros((), device=emb.device)
        for c0, c1 in c.ranges():
            kept = ctx.kept is not None and ws.uses("block") == ctx.kept
            if kernels is not None:  # one pass: dL/dcos * r, the coefficients and max |.|
                block = ws.get("block", (n, c1 - c0), torch.float32) if kept else None
                grad_r = ws.get("block_grad", (n, c1 - c0), torch.float32)
                a = kernels.margin_backward(
                    block if kept else c.dots(c0, c1, "block"), grad_r, not kept,
                    inv_norm[c0:c1], step, target, c0, c.active_of(c0, c1), t_logit, lse,
                    d_margin, s, ctx.margin.cos_bound, ctx.margin.interclass_filtering_threshold,
                    coefs[c0:c1], not fresh,
                )  # fmt: skip
                increment_version(coefs)  # written in C++: the finite check's cache must see it
                amax = torch.maximum(amax, a)
                with phases.span("head/gemm"):
                    c.backward_gemms(grad_r, c0, c1, grad_emb, grad_rows[c0:c1], fresh)
                continue
            if kept:
                cos = ws.get("block", (n, c1 - c0), torch.float32)  # forward's, intact
            else:
                cos = c.cosine(c0, c1, "block")
            logits, dirty = c.logits(cos, c0, c1, t_logit)
            # dL/dlogit = (softmax - onehot) * grad / N, then dL/dcos = s * that, times the
            # margin's derivative on the target column; filtered entries get none.
            probs = logits.sub_(lse[:, None]).exp_()
            col, inside = c.target_cols(c0, c1)
            picked = probs.gather(1, col)
            probs.scatter_(1, col, torch.where(inside, (picked - 1.0) * d_margin[:, None], picked))
            if dirty is not None:
                probs.masked_fill_(dirty, 0.0)
            clamped = c.clamped(cos, c0, c1)
            if clamped is not None:
                probs.masked_fill_(clamped, 0.0)
            r = inv_norm[c0:c1]
            grad_r = probs.mul_(r * step)  # dL/dcos * r, in one pass
            a = torch.linalg.vector_norm(grad_r, float("inf"))
            amax = torch.maximum(amax, a)
            # -r_j^2 sum_i dL/dcos_ij cos_ij, the normalisation's term, for the optimizer.
            coef = cos.mul_(grad_r).sum(dim=0).mul_(r).neg_()
            if fresh:
                coefs[c0:c1] = coef
            else:
                coefs[c0:c1] += coef
            with phases.span("head/gemm"):
                c.backward_gemms(grad_r, c0, c1, grad_emb, grad_rows[c0:c1], fresh)
        # |dL/drows| <= N max|g| max|e| entry by entry (fp32 accumulation stays within a few
        # ulps of it): where that bound is finite the GEMM's sums cannot have overflowed, so
        # the window's finite check reads this number and the S coefficients, not S x D.
        bound = amax * (n * torch.linalg.vector_norm(c.emb, float("inf")).float())
        if not fresh:
            bound = None if sink.bound is None else sink.bound + bound
        sink.grad, sink.coef, sink.bound = grad_rows, coefs, bound
        sink.bound_at = (grad_rows._version, coefs._version)
        return grad_emb, None, None, None, None, None, None, None, None, None


class _ForwardMargin:
    """The margin as one forward sees it: ``target_logit`` with that forward's per-row state
    (AdaFace's scalers) bound in. Only forward needs it (backward reuses the saved derivative),
    so the state travels with the margin rather than through the autograd function's inputs."""

    def __init__(self, margin, row_state: torch.Tensor) -> None:
        self.margin, self.row_state = margin, row_state
        self.s, self.cos_bound = margin.s, margin.cos_bound
        self.interclass_filtering_threshold = margin.interclass_filtering_threshold

    def target_logit(self, target: torch.Tensor) -> torch.Tensor:
        return self.margin.target_logit(target, row_state=self.row_state)


# An empty input that requires grad, so the rows get a backward even for frozen embeddings.
_ANCHOR = torch.empty(0, requires_grad=True)


def margin_softmax_cross_entropy(
    emb: torch.Tensor,
    rows: torch.Tensor,
    target: torch.Tensor,
    margin: CombinedMarginLoss | AdaFace,
    group: ProcessGroup,
    sink: GradSink,
    *,
    row_state: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    gemm_dtype: torch.dtype | None = None,
    chunk: int | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Mean margin-softmax cross-entropy of the global batch, identical on every rank.

    ``emb``: ``(N, D)`` unit embeddings of the global batch (fp32); ``rows``: this rank's ``S``
    sampled centres (any norm, fp32 or the GEMM dtype); ``target``: each row's column in
    ``rows`` or -1 when another rank owns it; ``active``: columns in the loss (``None``: all).
    ``dL/drows`` goes to ``sink`` in backward, as ``sink.grad + sink.coef[:, None] * rows``.
    ``row_state``: what ``margin.row_state`` returned for this forward (AdaFace's per-row
    scalers; ``None`` for ``CombinedMarginLoss``).
    """
    if row_state is not None:
        margin = _ForwardMargin(margin, row_state)
    inv_norm = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
    inv_norm = inv_norm.clamp_min_(1e-12).reciprocal_()
    if chunk is None:
        chunk = chunk_size(emb.shape[0], rows.shape[0])
    ws = workspace or Workspace(emb.device)
    opts = (None if gemm_dtype == torch.float32 else gemm_dtype, max(1, chunk), ws)
    return _ChunkedMarginCE.apply(
        emb, rows, inv_norm, target, active, margin, group, sink, opts, _ANCHOR
    )
