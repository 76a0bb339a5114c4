"""Momentum SGD on the sampled rows only: the row-sparse half of Partial FC's memory saving."""

from __future__ import annotations

import torch

from pfc_ds.head.partial_fc import PartialFC


class SparseSGD:
    """``torch.optim.SGD`` (momentum, dampening 0, L2 weight decay) restricted to sampled rows.

    Rows not sampled since the last ``zero_grad`` keep their weight *and* momentum bit-identical:
    no passive momentum update, unlike a dense optimizer over ``weight[index]``. The update runs
    in fp32 on gathered rows and is written back in the bank's storage dtype; nothing of size
    ``num_local x D`` is allocated. Several forwards before one ``step`` (gradient accumulation)
    update the union of their rows with the summed gradient.
    """

    def __init__(
        self, head: PartialFC, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}"
            )
        self.head = head
        self.param_groups = [{"lr": lr, "momentum": momentum, "weight_decay": weight_decay}]

    def _collect(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, grad, weights)`` over the union of pending rows, fp32, in workspace buffers."""
        head = self.head
        pending = [p for p in head.pending if p.grad is not None]
        dim, ws = head.embedding_size, head.workspace
        if not pending:
            index = torch.empty(0, dtype=torch.long, device=head.bank.device)
            empty = torch.empty(0, dim, device=index.device)
            return index, empty, empty
        if len(pending) == 1:
            # The forward's fp32 rows are exactly the stored weights: nothing changed since.
            p = pending[0]
            return p.index, p.grad, p.rows
        index = torch.cat([p.index for p in pending])
        union, inverse = torch.unique(index, return_inverse=True)
        grad = ws.get("union_grad", (len(union), dim), torch.float32).zero_()
        grad.index_add_(0, inverse, torch.cat([p.grad for p in pending]))
        weights = head.bank.gather(union, out=ws.get("union_rows", grad.shape, torch.float32))
        return union, grad, weights

    def has_nonfinite(self) -> bool:
        """Whether any pending row gradient is inf/NaN (local; the trainer all-reduces it).

        Checked per forward's gradient, so calling it after every micro-batch of an
        accumulation window costs one sum per micro-batch, not a union per call.
        """
        return not all(p.grad_is_finite() for p in self.head.pending)

    @torch.no_grad()
    def step(self, grad_scale: float = 1.0) -> bool:
        """Unscale by ``grad_scale`` and update the pending rows; ``False`` if a grad is non-finite.

        A non-finite gradient is reported, not applied: weights and momentum stay untouched.
        A successful step consumes the pending rows; after a skipped one call ``zero_grad``.
        """
        if self.has_nonfinite():
            return False
        rows, g, w = self._collect()
        if len(rows) == 0:
            return True
        group = self.param_groups[0]
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        bank = self.head.bank
        if grad_scale != 1.0:
            g.div_(grad_scale)
        if wd:
            g.add_(w, alpha=wd)
        if mom:
            buf = self.head.workspace.get("momentum", tuple(g.shape), torch.float32)
            buf = bank.gather_momentum(rows, out=buf)
            torch.add(g, buf, alpha=mom, out=buf)
        else:
            buf = g
        w.add_(buf, alpha=-lr)
        bank.apply_update(rows, w, buf if mom else None)
        self.head.pending.clear()  # consumed: a second step() without a forward is a no-op
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the pending rows (their gradients go with them)."""
        self.head.pending.clear()

    def state_dict(self) -> dict:
        return {"param_groups": [dict(g) for g in self.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        self.param_groups = [dict(g) for g in state["param_groups"]]
