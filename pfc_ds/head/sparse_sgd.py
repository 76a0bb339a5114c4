"""Momentum SGD on the sampled rows only: the row-sparse half of Partial FC's memory saving."""

from __future__ import annotations

import torch

from pfc_ds.head import cpu_kernels, row_kernels
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

    On the CPU the update is ``row_kernels``' compiled pass (one read and one write of each
    row's weight and momentum, written and rounded straight into a device bank); CUDA, or a
    machine where the kernel cannot be built, runs the same arithmetic as torch ops.
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
        if not cpu_kernels.usable(rg.grad):
            self._update_eager(rg, apply, on, scale, lr, mom, wd)
            return
        # One compiled pass per row; rows where nothing applies are skipped, so their
        # gradient needs no masking. A device bank is written (and rounded) in that same pass.
        direct = None if rg.full else bank.direct_rows(*(("momentum",) if mom else ()))
        reads = ("momentum",) if mom and not rg.full and direct is None else ()
        for b in self._blocks(rg, apply, on, reads):
            if direct is not None:
                bank.note_finite(
                    row_kernels.sgd_scatter(
                        direct, b.index.storage, b.weight, b.grad, b.coef, b.on, scale, lr, mom,
                        wd,
                    )
                )  # fmt: skip
                continue
            buf = None
            if mom:
                buf = bank.momentum[b.r0 : b.r1] if rg.full else b.states["momentum"]
            row_kernels.sgd_block_(b.weight, b.grad, buf, b.coef, b.on, scale, lr, mom, wd)
            self._write(bank, b, buf, rg.full)

    def _update_eager(
        self,
        rg: RowGrads,
        apply: torch.Tensor,
        on: torch.Tensor,
        scale: torch.Tensor | float,
        lr: float,
        mom: float,
        wd: float,
    ) -> None:
        """The same update in torch ops (CUDA, or no compiled kernel)."""
        bank = self.head.bank
        self._mask(rg, apply)
        inv = scale.reciprocal() if isinstance(scale, torch.Tensor) else 1.0 / scale
        # An fp32 bank at sample_rate 1 is updated in place: its momentum is fp32 too.
        reads = ("momentum",) if mom and not rg.full else ()
        for b in self._blocks(rg, apply, on, reads):
            g, w = b.grad, b.weight
            # g <- scale * (dL/dw + wd * w): the normalisation's coefficient and the weight
            # decay in one pass (per-row factor; 0 where nothing applies).
            g.addcmul_(w, b.coef[:, None] + b.on * (wd * scale))
            buf = None
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
            self._write(bank, b, buf, rg.full)

    @staticmethod
    def _write(bank, b, buf: torch.Tensor | None, in_place: bool) -> None:
        # w - lr * buf is non-finite wherever buf is (0 * inf is NaN too), so the weight's
        # finite check covers an fp32 momentum's; a half one still needs its own range check.
        half_momentum = buf is not None and bank.states["momentum"].dtype != torch.float32
        bank.apply_update(b.index, b.weight, buf, in_place=in_place, check_momentum=half_momentum)
