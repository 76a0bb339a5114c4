"""AdaFace (Kim et al., CVPR 2022): a margin that adapts to image quality through feature norms.

Follows mk-minchul/AdaFace ``head.py``. A low feature norm (a hard, low-quality image) moves the
margin towards CosFace's additive cosine margin, a high one towards ArcFace's angular margin:

    norm    = clip(|x|, 0.001, 100)                           (detached)
    mean   <- t_alpha * batch_mean(norm) + (1 - t_alpha) * mean      (from 20)
    std    <- t_alpha * batch_std(norm)  + (1 - t_alpha) * std       (from 100; unbiased)
    scaler  = clip(h * (norm - mean) / (std + 1e-3), -1, 1)    (the statistics just updated)
    target  = cos(clip(theta - m * scaler, 1e-3, pi - 1e-3)) - (m + m * scaler)
    logits  = s * target on the target column, s * cos elsewhere, cos in [-1 + 1e-3, 1 - 1e-3]

In ``PartialFC`` the statistics are those of the *global* batch: every rank computes them from
the gathered embeddings (which carry their norms, so no collective is added) and gets the same
numbers, hence a result independent of the world size. They are updated once per head forward
(``row_state``), never in ``target_logit`` nor in backward, and kept as 0-dim fp32 buffers on the
head's device: checkpointed with the head (``margin_loss.batch_mean``, ``margin_loss.batch_std``),
the same on every rank, and never read back to the host.
"""

from __future__ import annotations

import math

import torch

# The reference's eps: the cosine clamp, the angle clip and the std's offset.
EPS = 1e-3
NORM_MIN, NORM_MAX = 0.001, 100.0
INITIAL_MEAN, INITIAL_STD = 20.0, 100.0


class AdaFace(torch.nn.Module):
    """AdaFace's quality-adaptive margin, usable as ``PartialFC(AdaFace(...), ...)``.

    ``s``: logit scale; ``m``: margin; ``h``: how far the norm moves it (``h = 0`` is CosFace with
    margin ``m``); ``t_alpha``: the running statistics' momentum (0 freezes them at 20 and 100).

    The head calls ``row_state(norms)`` once per forward with the raw embeddings' norms, then
    ``target_logit(target_cos, row_state)``. ``forward(cos_logits, norms, labels)`` is the
    single-process form (the reference's, on given cosines).
    """

    # Every cosine is clamped to [-cos_bound, cos_bound]; the head zeroes dL/dcos where it was.
    cos_bound = 1.0 - EPS
    interclass_filtering_threshold = 0.0  # AdaFace filters no negatives

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01):
        super().__init__()
        if not s > 0:
            raise ValueError(f"AdaFace scale s must be > 0, got {s}")
        if not 0.0 <= m < math.pi / 2:
            raise ValueError(f"AdaFace margin m must be in [0, pi/2), got {m}")
        if not h >= 0.0:
            raise ValueError(f"AdaFace h must be >= 0, got {h}")
        if not 0.0 <= t_alpha <= 1.0:
            raise ValueError(f"AdaFace t_alpha must be in [0, 1], got {t_alpha}")
        self.s, self.m, self.h, self.t_alpha = float(s), float(m), float(h), float(t_alpha)
        self.register_buffer("batch_mean", torch.full((), INITIAL_MEAN, dtype=torch.float32))
        self.register_buffer("batch_std", torch.full((), INITIAL_STD, dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"

    @torch.no_grad()
    def row_state(self, norms: torch.Tensor) -> torch.Tensor:
        """Update the running statistics with this batch's norms (``(N,)``, any grad; detached
        here) and return each row's margin scaler ``(N,)``. One call per forward: each call is
        one update, as each forward of the reference is."""
        if norms.dim() != 1 or norms.shape[0] < 2:
            raise ValueError(
                f"AdaFace needs the norms of a batch of at least 2 rows (its std is unbiased), "
                f"got shape {tuple(norms.shape)}"
            )
        safe = norms.detach().to(self.batch_mean.dtype).clamp(NORM_MIN, NORM_MAX)
        mean, std = safe.mean(), safe.std()
        self.batch_mean.copy_(mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean)
        self.batch_std.copy_(std * self.t_alpha + (1 - self.t_alpha) * self.batch_std)
        scaler = (safe - self.batch_mean) / (self.batch_std + EPS)
        return (scaler * self.h).clamp_(-1.0, 1.0)

    def target_logit(
        self, target: torch.Tensor, row_state: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The unscaled target logit of each row from its target cosine and its scaler
        (``row_state``); differentiable in ``target`` (zero where a clamp or clip binds)."""
        if row_state is None:
            raise ValueError(
                "AdaFace.target_logit needs row_state (the scaler from row_state(norms)): "
                "AdaFace's margin depends on each row's feature norm"
            )
        theta = torch.arccos(target.clamp(-self.cos_bound, self.cos_bound))
        theta_m = torch.clip(theta + (-self.m * row_state), EPS, math.pi - EPS)
        return torch.cos(theta_m) - (self.m + self.m * row_state)

    def forward(
        self, cos_logits: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Scaled logits ``(N, C)`` from cosines ``(N, C)``, feature norms ``(N,)`` or ``(N, 1)``
        and labels ``(N,)`` (``-1``: no target here, no margin). Updates the statistics."""
        scaler = self.row_state(norms.reshape(-1))
        cos = cos_logits.clamp(-self.cos_bound, self.cos_bound)
        rows = torch.nonzero(labels != -1).squeeze(1)
        cols = labels[rows]
        target = self.target_logit(cos[rows, cols], scaler[rows])
        return cos.index_put((rows, cols), target) * self.s
