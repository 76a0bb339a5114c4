"""Additive margins on cosine logits: ArcFace, CosFace and their combination.

``CombinedMarginLoss`` keeps insightface's name and call signature
(``margin(cos_logits, labels) -> scaled logits``) so configs carry over, but it differs where
insightface is silently lossy:

* the ArcFace gradient is the exact one, by autograd through ``cos(arccos(x) + m2)``; insightface
  computes the margin under ``no_grad`` (a straight-through estimator), which stays available as
  ``straight_through=True``;
* unsupported combinations raise ``ValueError`` saying why, instead of a bare ``raise``.
"""

from __future__ import annotations

import math

import torch

# Keeps d/dx arccos(x) = -1/sqrt(1 - x^2) finite at |cos| = 1 (about 2.2e3 at the clamp edge).
_ACOS_EPS = 1e-7


class CombinedMarginLoss(torch.nn.Module):
    """``s * (cos(m1 * theta + m2) - m3)`` on the target logit, ``s * cos(theta)`` elsewhere.

    ``(1, m2, 0)`` is ArcFace, ``(1, 0, m3)`` CosFace, ``(1, 0, 0)`` a plain scaled softmax, and
    ``(1, m2, m3)`` the additive combination. A label of ``-1`` marks a row whose positive class
    lives on another rank's shard: the row gets no margin.

    ``interclass_filtering_threshold > 0`` zeroes negative logits above the threshold (insightface's
    filter for noisy near-duplicate identities); targets are never filtered.

    The head's margin interface (shared with ``AdaFace``): ``s``, ``cos_bound`` (cosines are
    clamped to ``[-cos_bound, cos_bound]``), ``interclass_filtering_threshold``,
    ``row_state(norms)`` (per-row state of a forward; none here) and ``target_logit``.
    """

    cos_bound = 1.0

    def __init__(
        self,
        s: float,
        m1: float,
        m2: float,
        m3: float,
        interclass_filtering_threshold: float = 0.0,
        straight_through: bool = False,
    ) -> None:
        super().__init__()
        if not s > 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        if m1 != 1.0:
            raise ValueError(
                f"m1={m1}: only m1 == 1.0 is supported; a multiplicative angular margin "
                "(SphereFace) needs a piecewise psi(theta) that this head does not implement"
            )
        if not 0.0 <= m2 < math.pi / 2:
            raise ValueError(f"additive angular margin m2 must be in [0, pi/2), got {m2}")
        if not 0.0 <= m3 < 1.0:
            raise ValueError(f"additive cosine margin m3 must be in [0, 1), got {m3}")
        if not 0.0 <= interclass_filtering_threshold < 1.0:
            raise ValueError(
                "interclass_filtering_threshold must be in [0, 1), got "
                f"{interclass_filtering_threshold}"
            )
        if straight_through and m2 == 0.0:
            raise ValueError("straight_through only changes the ArcFace margin; it needs m2 > 0")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.straight_through = straight_through

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"filter={self.interclass_filtering_threshold}, straight_through={self.straight_through}"
        )

    def row_state(self, norms: torch.Tensor) -> None:
        """Nothing: this margin depends on the cosine only, not on the feature norms."""
        return None

    def target_logit(
        self, target: torch.Tensor, row_state: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The margin applied to target cosines: ``cos(m1 * theta + m2) - m3`` (unscaled);
        ``row_state`` is unused (always ``None`` from ``row_state``)."""
        if self.m2 > 0.0:
            if self.straight_through:
                with torch.no_grad():
                    delta = torch.cos(torch.arccos(target.clamp(-1.0, 1.0)) + self.m2) - target
                target = target + delta
            else:
                theta = torch.arccos(target.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
                target = torch.cos(theta + self.m2)
        if self.m3 > 0.0:
            target = target - self.m3
        return target

    def filter_mask(
        self, logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor | None:
        """Negatives above the inter-class filtering threshold, or ``None`` when it is off."""
        if self.interclass_filtering_threshold <= 0.0:
            return None
        with torch.no_grad():
            dirty = logits > self.interclass_filtering_threshold
            dirty[rows, cols] = False
        return dirty

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``logits``: cosines ``(N, S)``; ``labels``: ``(N,)`` column of the target, or -1."""
        rows = torch.nonzero(labels != -1).squeeze(1)
        cols = labels[rows]
        out = logits * self.s
        dirty = self.filter_mask(logits, rows, cols)
        if dirty is not None:
            out.masked_fill_(dirty, 0.0)
        if self.m2 > 0.0 or self.m3 > 0.0:
            out.index_put_((rows, cols), self.target_logit(logits[rows, cols]) * self.s)
        return out
