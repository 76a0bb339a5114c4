"""Linear warmup then polynomial decay, one closed form for the backbone and the head.

``lr(k)`` is the LR of optimizer step ``k`` (0-based; micro-steps of gradient accumulation do not
count, insightface #1996):

* warmup, ``k < W``: ``base * (k + 1) / W``;
* decay, ``k >= W``: ``base * (1 - (k - W) / (T - W)) ** power``, never below 0.

For ``k >= W`` this is insightface's ``PolynomialLRWarmup`` exactly. In warmup it is shifted by one
so the first step is not at LR 0 and there is no jump: insightface's step 0 runs at the full base
LR (its scheduler returns ``group["lr"]`` when ``last_epoch == 0``), then drops to ``base / W``.

Being a pure function of the step, the schedule needs no state in a checkpoint and is exact on
resume; ``apply`` writes one multiplier into every optimizer's param groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class PolynomialLRWarmup:
    def __init__(self, warmup_steps: int, total_steps: int, power: float = 1.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, {total_steps}], got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.power = power

    def factor(self, step: int) -> float:
        """The LR multiplier of optimizer step ``step``."""
        w, t = self.warmup_steps, self.total_steps
        if step < w:
            return (step + 1) / w
        if t == w:
            return 1.0
        return max(0.0, 1.0 - (step - w) / (t - w)) ** self.power

    def apply(
        self, step: int, groups_and_base_lrs: Iterable[tuple[Sequence[dict], float]]
    ) -> float:
        """Set ``lr = base * factor(step)`` in each param-group list; return the factor."""
        f = self.factor(step)
        for groups, base in groups_and_base_lrs:
            for group in groups:
                group["lr"] = base * f
        return f
