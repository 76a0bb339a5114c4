"""Momentum SGD on the sampled rows only: the row-sparse half of Partial FC's memory saving."""

from __future__ import annotations

import torch

from pfc_ds.head.partial_fc import RowGrads
from pfc_ds.head.row_optimizer import RowSparseHead, RowSparseOptimizer


class SparseSGD(RowSparseOptimizer):
    """``torch.optim.SGD`` (momentum, dampening 0, L2 weight decay) restricted to sampled rows.

    Rows not sampled in the window keep their weight *and* momentum bit-identical: no passive
    momentum update, unlike a dense optimizer over ``weight[index]``. The update runs in fp32,
    block by block of sampled rows (``row_blocks``: its buffers are one block, two for an
    offloaded bank, which reads the next block while this one is updated), and is written back
    in the bank's storage dtype; nothing of size ``num_local x D`` is allocated (at
    ``sample_rate = 1`` an fp32 bank is updated in place). Under gradient accumulation the
    window's rows get the gradient summed over its micro-batches.

    ``step`` makes no host sync: a non-finite gradient turns the update into an exact no-op on
    the device (every factor multiplied by 0), and the result comes back as a device flag.
    """

    def __init__(
        self, head: RowSparseHead, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}"
            )
        super().__init__(head, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if momentum:
            head.bank.ensure_state("momentum")

    def _update(
        self, rg: RowGrads, apply: torch.Tensor, on: torch.Tensor, scale: torch.Tensor | float
    ) -> None:
        group = self.param_groups[0]
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        bank = self.head.bank
        if mom:
            bank.ensure_state("momentum")
        inv = scale.reciprocal() if isinstance(scale, torch.Tensor) else 1.0 / scale
        # An fp32 bank at sample_rate 1 is updated in place: its momentum is fp32 too.
        reads = ("momentum",) if mom and not rg.full else ()
        for b in self._blocks(rg, apply, on, reads):
            g, w = b.grad, b.weight
            # g <- scale * (dL/dw + wd * w): the normalisation's coefficient and the weight
            # decay in one pass (per-row factor; 0 where nothing applies).
            g.addcmul_(w, b.coef[:, None] + b.on * (wd * scale))
            if mom:
                buf = bank.momentum[b.r0 : b.r1] if rg.full else b.states["momentum"]
                # Where nothing applies: buf * 1 + 0 and w + buf * 0, both exact.
                buf.mul_(torch.where(b.apply, mom, 1.0))
                if isinstance(inv, float):
                    buf.add_(g, alpha=inv)
                else:
                    buf.addcmul_(g, inv)
                torch.addcmul(w, buf, b.on * -lr, out=w)
            else:
                torch.addcmul(w, g, b.on * (-lr * inv), out=w)
            # w - lr * buf is non-finite wherever buf is (0 * inf is NaN too), so the weight's
            # finite check covers an fp32 momentum's; a half one still needs its own range check.
            bank.apply_update(
                b.index, w, buf if mom else None, in_place=rg.full,
                check_momentum=bank.states["momentum"].dtype != torch.float32 if mom else False,
            )  # fmt: skip
