"""Lazy AdamW on the sampled rows: the ViT recipes' optimizer, row-sparse like ``SparseSGD``."""

from __future__ import annotations

import torch

from pfc_ds.head.partial_fc import RowGrads
from pfc_ds.head.row_optimizer import RowSparseHead, RowSparseOptimizer


class SparseAdamW(RowSparseOptimizer):
    """``torch.optim.AdamW`` (decoupled weight decay, bias correction) on sampled rows only.

    Each row keeps its own step count, so a row sampled at every step follows
    ``torch.optim.AdamW`` exactly, and a row sampled now and then is corrected for the steps it
    actually took (lazy Adam). Unsampled rows keep weight, moments and count bit-identical. The
    moments live in the bank's ``momentum_dtype`` (fp32 is advisable under fp16 storage: a
    squared gradient below 6e-8 is zero in fp16) and are checkpointed and resharded like
    momentum. As ``SparseSGD``: fp32 math block by block, stochastic rounding back to half
    storage, no host sync, a device flag as the result.
    """

    def __init__(
        self,
        head: RowSparseHead,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        b1, b2 = betas
        if lr < 0 or eps <= 0 or weight_decay < 0 or not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(
                f"need lr >= 0, eps > 0, weight_decay >= 0, betas in [0, 1); got lr={lr}, "
                f"betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        super().__init__(head, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)
        for name in ("exp_avg", "exp_avg_sq", "steps"):
            head.bank.ensure_state(name)

    def _update(
        self, rg: RowGrads, apply: torch.Tensor, on: torch.Tensor, scale: torch.Tensor | float
    ) -> None:
        group = self.param_groups[0]
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bank, ws = self.head.bank, self.head.workspace
        self._mask(rg, apply)
        inv = scale.reciprocal() if isinstance(scale, torch.Tensor) else 1.0 / scale
        for b in self._blocks(rg, apply, on, ("steps", "exp_avg", "exp_avg_sq")):
            g, w, a, o = b.grad, b.weight, b.apply, b.on
            steps, m, v = b.states["steps"], b.states["exp_avg"], b.states["exp_avg_sq"]
            g.addcmul_(w, b.coef[:, None]).mul_(inv)  # dL/dw, unscaled
            steps.add_(a.reshape(-1).to(torch.int32) if a.dim() else a.to(torch.int32))
            # Where nothing applies every factor is 1 and every increment 0: exact no-ops.
            m.mul_(torch.where(a, b1, 1.0)).add_(g, alpha=1 - b1)
            v.mul_(torch.where(a, b2, 1.0)).addcmul_(g, g, value=1 - b2)
            t = steps.clamp_min(1).to(torch.float32)[:, None]
            step_size = o * lr / (1 - b1**t)
            denom = ws.get("adam_denom", g.shape, torch.float32)
            torch.sqrt(v, out=denom).div_(torch.sqrt(1 - b2**t)).add_(eps)
            w.mul_(1 - o * (lr * wd))
            w.sub_(torch.div(m, denom, out=denom).mul_(step_size))
            bank.apply_update(b.index, w, None, in_place=rg.full)
            bank.write_state("exp_avg", b.index, m)
            bank.write_state("exp_avg_sq", b.index, v)
            bank.write_state("steps", b.index, steps)
