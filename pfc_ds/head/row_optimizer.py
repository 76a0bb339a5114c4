"""What the row-sparse optimizers share: the head they see, the pending rows they take, and the
device mask that turns an update into an exact no-op where a gradient is non-finite."""

from __future__ import annotations

from typing import Protocol

import torch

from pfc_ds.head.bank import CenterBank
from pfc_ds.head.partial_fc import RowGrads
from pfc_ds.head.workspace import Workspace


class RowSparseHead(Protocol):
    """All a sparse optimizer needs of a head (``PartialFC`` is one)."""

    bank: CenterBank
    workspace: Workspace

    def row_grads(self) -> RowGrads | None: ...

    def grads_finite(self) -> torch.Tensor: ...

    def clear_pending(self) -> None: ...


class RowSparseOptimizer:
    """Base of ``SparseSGD`` and ``SparseAdamW``: one param group, torch's optimizer surface."""

    def __init__(self, head: RowSparseHead, **group) -> None:
        self.head = head
        self.param_groups = [group]

    def has_nonfinite(self) -> torch.Tensor:
        """0-dim device bool: a pending row gradient is inf/NaN (local; the trainer all-reduces
        it). One sum per micro-batch's gradient, cached, so calling it after each micro-batch
        of an accumulation window costs no union."""
        return ~self.head.grads_finite()

    def _take(
        self, grad_scale: float | torch.Tensor
    ) -> tuple[RowGrads, torch.Tensor, torch.Tensor] | None:
        """Consume the pending rows: ``(rows, apply, on)`` with the gradient unscaled and zeroed
        where nothing may change (``apply``: bool, ``on``: its 0/1 float); ``None`` if none."""
        rg = self.head.row_grads()
        self.head.clear_pending()
        if rg is None:
            return None
        apply = rg.finite if rg.mask is None else (rg.finite & rg.mask)[:, None]
        rg.grad.masked_fill_(~apply, 0.0).div_(grad_scale)
        return rg, apply, apply.to(torch.float32)

    def _nothing(self) -> torch.Tensor:
        return torch.ones((), dtype=torch.bool, device=self.head.bank.device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the pending rows (their gradients go with them)."""
        self.head.clear_pending()

    def state_dict(self) -> dict:
        return {"param_groups": [dict(g) for g in self.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        self.param_groups = [dict(g) for g in state["param_groups"]]
