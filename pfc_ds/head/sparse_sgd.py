"""Momentum SGD on the sampled rows only: the row-sparse half of Partial FC's memory saving."""

from __future__ import annotations

import torch

from pfc_ds.head.row_optimizer import RowSparseHead, RowSparseOptimizer


class SparseSGD(RowSparseOptimizer):
    """``torch.optim.SGD`` (momentum, dampening 0, L2 weight decay) restricted to sampled rows.

    Rows not sampled since the last ``zero_grad`` keep their weight *and* momentum bit-identical:
    no passive momentum update, unlike a dense optimizer over ``weight[index]``. The update runs
    in fp32, block by block of sampled rows (``row_blocks``: its buffers are one block), and is
    written back in the bank's storage dtype; nothing of size ``num_local x D`` is allocated
    (at ``sample_rate = 1`` an fp32 bank is updated in place).
    Several forwards before one ``step`` (gradient accumulation) update the union of their rows
    with the summed gradient.

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

    @torch.no_grad()
    def step(self, grad_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Unscale by ``grad_scale`` and update the pending rows; returns a 0-dim device bool,
        ``False`` when a gradient was non-finite and nothing changed.

        The pending rows are consumed either way.
        """
        taken = self._take(grad_scale)
        if taken is None:
            return self._nothing()
        rg, apply, on = taken
        group = self.param_groups[0]
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        head = self.head
        bank, ws = head.bank, head.workspace
        if mom:
            bank.ensure_state("momentum")
        for r0, r1 in rg.blocks():
            index, g = rg.index[r0:r1], rg.grad[r0:r1]
            a, o = (apply[r0:r1], on[r0:r1]) if apply.dim() else (apply, on)
            w = rg.weight(r0, r1, bank, ws)
            if wd:
                torch.addcmul(g, w, o * wd, out=g)
            if mom:
                if rg.full:  # an fp32 bank at sample_rate 1: its momentum is fp32 too
                    buf = bank.momentum[r0:r1]
                else:
                    buf = ws.get("momentum", tuple(g.shape), torch.float32)
                    bank.gather_state("momentum", index, out=buf)
                # Where nothing applies: buf * 1 + 0 and w + buf * 0, both exact.
                buf.mul_(torch.where(a, mom, 1.0)).add_(g)
            else:
                buf = g
            torch.addcmul(w, buf, o * -lr, out=w)
            if not rg.full:
                bank.apply_update(index, w, buf if mom else None)
        return rg.finite
