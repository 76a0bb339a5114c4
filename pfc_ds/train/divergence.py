"""When training diverges: detect it without per-step syncs, and never checkpoint its result.

Under fp16 an overflow skips both optimizers and backs the loss scale off; a few in a row are
normal, a storm is not. ``ScaleGuard`` reads only what the step already brought to the host
(DeepSpeed's overflow flag and the scale) and calls it divergence after
``train.max_consecutive_skips`` skipped steps in a row, or an overflow at the minimum scale (the
scale cannot back off further, so every later step would be skipped too). Under fp32/bf16 the
lockstep's deferred non-finite check (read at the logging interval) is the signal. And before any
checkpoint is written, ``nonfinite_weights`` checks every weight on its device, with one host
sync per save, so a diverged state never becomes the "last good" checkpoint.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch
import torch.distributed as dist


class DivergenceError(FloatingPointError):
    """Training diverged; the message names the step, the scale history and the last good
    checkpoint."""


class Rollback(Exception):
    """Raised inside the loop to reload the last good checkpoint (``train.on_divergence``)."""


class ScaleGuard:
    """Consecutive fp16 skips and the loss-scale history of the steps that ran."""

    def __init__(self, max_skips: int, min_scale: float | None) -> None:
        self.max_skips = max_skips
        self.min_scale = min_scale  # None: a static scale, which never backs off
        self.skips = 0
        self.history: deque[tuple[int, float]] = deque(maxlen=16)  # (first step, scale)

    @classmethod
    def for_engine(cls, ds: dict, max_skips: int) -> ScaleGuard:
        """The guard of a DeepSpeed config: a minimum scale only under dynamic fp16 scaling."""
        fp16 = ds.get("fp16", {})
        dynamic = fp16.get("enabled") and not fp16.get("loss_scale", 0)
        return cls(max_skips, fp16.get("min_loss_scale", 1) if dynamic else None)

    def record(self, step: int, applied: bool, scale: float | None) -> str | None:
        """Note step ``step`` (run at ``scale``); the reason it diverged, or ``None``."""
        if scale is not None and (not self.history or self.history[-1][1] != scale):
            self.history.append((step, scale))
        self.skips = 0 if applied else self.skips + 1
        if applied:
            return None
        if self.skips >= self.max_skips:
            return (
                f"step {step}: {self.skips} optimizer steps in a row skipped for non-finite "
                f"gradients (train.max_consecutive_skips={self.max_skips})"
            )
        if scale is not None and self.min_scale is not None and scale <= self.min_scale:
            return (
                f"step {step}: overflow at the minimum loss scale {scale:g} (min_loss_scale), "
                "which cannot back off further"
            )
        return None

    def history_text(self) -> str:
        if not self.history:
            return "no loss scale"
        return "loss scale " + ", ".join(f"{s:g} from step {k}" for k, s in self.history)

    def reset(self) -> None:
        self.skips = 0
        self.history.clear()


def nonfinite_weights(
    tensors: Iterable[torch.Tensor],
    device: torch.device,
    finite_flags: Iterable[torch.Tensor] = (),
) -> bool:
    """Whether any rank holds a non-finite value in ``tensors``, or a 0-dim ``finite_flags``
    entry is false (collective; one host sync)."""
    flags = [
        (~torch.isfinite(t).all()).to(device)
        for t in tensors
        if t.numel() and t.is_floating_point()
    ]
    flags += [(~f).to(device).reshape(()) for f in finite_flags]
    flag = torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool)
    flag = flag.to(device=device, dtype=torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def decide(message: str, on_divergence: str, target, why: str | None) -> None:
    """Training diverged (``message``): raise ``Rollback`` to roll back to ``target`` (the
    checkpointer's rollback target, ``why`` it has none) or ``DivergenceError`` to stop."""
    if on_divergence != "rollback":
        raise DivergenceError(
            f"{message} (resume it with --resume at a lower optim.lr, or set "
            "train.on_divergence: rollback)"
        )
    if target is None:
        raise DivergenceError(f"{message} ({why}; stopping)")
    raise Rollback(message)


def nonfinite_model(engine, head) -> bool:
    """Any NaN/inf in the backbone or the head's rows, on any rank (one sync). The head's bank
    keeps a flag of the values written to it, so its rows (maybe a disk bank's every page) are
    not read; under ZeRO-3 each rank checks its partition."""
    tensors = []
    for p in engine.module.parameters():
        part = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition
        tensors.append(p if part is None else part)
    return nonfinite_weights(tensors, engine.device, finite_flags=[head.bank.all_finite()])
