"""What the row-sparse optimizers share: the head they see, the window's rows they take block by
block, and the device mask that turns an update into an exact no-op where a gradient is
non-finite."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from pfc_ds.head.bank import CenterBank, Pending, RowIndex
from pfc_ds.head.partial_fc import RowGrads
from pfc_ds.head.workspace import Workspace


class RowSparseHead(Protocol):
    """All a sparse optimizer needs of a head (``PartialFC`` is one)."""

    bank: CenterBank
    workspace: Workspace

    def row_grads(self) -> RowGrads | None: ...

    def grads_finite(self) -> torch.Tensor: ...

    def clear_window(self) -> None: ...


@dataclass
class Block:
    """Rows ``r0:r1`` of the window with everything an update needs, all on the compute device:
    the masked, still loss-scaled gradient as ``grad + coef[:, None] * weight`` (the update
    folds ``coef`` and the unscale ``inv_scale`` into its own passes), fp32 weights to update
    in place, fp32 row states (``int32`` steps), and ``apply``/``on``: where the update
    applies (bool, and as 0/1 fp32)."""

    r0: int
    r1: int
    index: RowIndex
    grad: torch.Tensor
    coef: torch.Tensor
    weight: torch.Tensor
    states: dict[str, torch.Tensor]
    apply: torch.Tensor
    on: torch.Tensor


class RowSparseOptimizer:
    """Base of ``SparseSGD`` and ``SparseAdamW``: one param group, torch's optimizer surface."""

    def __init__(self, head: RowSparseHead, **group) -> None:
        self.head = head
        self.param_groups = [group]

    def has_nonfinite(self) -> torch.Tensor:
        """0-dim device bool: the window's row gradient is inf/NaN (local; the trainer
        all-reduces it). One sum per gradient version, cached, so calling it after each
        micro-batch of an accumulation window costs one sum each."""
        return ~self.head.grads_finite()

    @torch.no_grad()
    def step(self, grad_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Unscale by ``grad_scale`` and update the window's rows; returns a 0-dim device bool,
        ``False`` when a gradient was non-finite and nothing changed.

        The window is consumed either way. No host sync: a non-finite gradient turns the update
        into an exact no-op on the device (every factor multiplied by 0 or 1). The gradient is
        not unscaled in a pass of its own: ``1 / grad_scale`` rides in the update's factors.
        """
        rg = self.head.row_grads()
        if rg is None:
            self.head.clear_window()
            return torch.ones((), dtype=torch.bool, device=self.head.bank.device)
        try:
            self.head.bank.next_step()  # a fresh rounding key for this step's writes
            apply = rg.finite if rg.mask is None else (rg.finite & rg.mask)[:, None]
            # A Python scale stays one (no host-to-device copy for a number).
            scale = grad_scale if isinstance(grad_scale, torch.Tensor) else float(grad_scale)
            self._update(rg, apply, apply.to(torch.float32), scale)
        finally:
            self.head.clear_window()  # after the last write is queued: its index buffer is free
        return rg.finite

    def _update(
        self, rg: RowGrads, apply: torch.Tensor, on: torch.Tensor, scale: torch.Tensor | float
    ) -> None:
        """Update the window's rows with the gradient ``(grad + coef * w) / scale`` where
        ``apply``; every other row keeps its weight and states bit-identical."""
        raise NotImplementedError

    @staticmethod
    def _mask(rg: RowGrads, apply: torch.Tensor) -> None:
        """Zero the gradient where nothing applies, so that torch ops over every row (whose
        factors are 0 or 1 there) are exact no-ops even where it is inf or NaN."""
        rg.grad.masked_fill_(~apply, 0.0)
        rg.coef.masked_fill_(~apply.reshape(-1) if apply.dim() else ~apply, 0.0)

    def _blocks(
        self, rg: RowGrads, apply: torch.Tensor, on: torch.Tensor, states: tuple[str, ...]
    ) -> Iterator[Block]:
        """The window's rows block by block, with fp32 weights and the named states gathered.

        For an offloaded bank the next block's gathers are queued before this block is handed
        out, so the lane reads them from host memory or disk while the device updates this one
        (two workspace buffers per tensor); a device bank gathers each block as it comes.
        """
        bank, ws = self.head.bank, self.head.workspace
        ahead = not bank.resident
        spans = list(rg.blocks())
        dim = rg.grad.shape[1]

        def start(i: int) -> tuple[Pending, dict[str, Pending]]:
            r0, r1 = spans[i]
            slot = i % 2 if ahead else 0
            rows = rg.index[r0:r1]
            reads = {}
            for name in states:
                steps = name == "steps"
                shape, dtype = (
                    ((r1 - r0,), torch.int32) if steps else ((r1 - r0, dim), torch.float32)
                )
                out = ws.get(f"{name}{slot}", shape, dtype)
                reads[name] = bank.gather_state_async(name, rows, out)
            return rg.weight_async(r0, r1, bank, ws, slot), reads

        queued = start(0) if spans else None
        for i, (r0, r1) in enumerate(spans):
            weight, reads = queued if ahead or i == 0 else start(i)
            if ahead and i + 1 < len(spans):
                queued = start(i + 1)
            a, o = (apply[r0:r1], on[r0:r1]) if apply.dim() else (apply, on)
            yield Block(
                r0,
                r1,
                rg.index[r0:r1],
                rg.grad[r0:r1],
                rg.coef[r0:r1],
                weight.wait(),
                {name: p.wait() for name, p in reads.items()},
                a,
                o,
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the window (its gradients go with it)."""
        self.head.clear_window()

    def state_dict(self) -> dict:
        return {"param_groups": [dict(g) for g in self.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        self.param_groups = [dict(g) for g in state["param_groups"]]
