"""Independent float64 references: full-softmax margin CE on the whole matrix, torch.optim.SGD.

Written straight from the formulas, sharing no code with pfc_ds.head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def margin_logits(
    emb: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    s: float,
    m2: float,
    m3: float,
    filter_threshold: float = 0.0,
    straight_through: bool = False,
) -> torch.Tensor:
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()
    onehot = F.one_hot(labels, weight.shape[0]).bool()
    theta = torch.arccos(cos.clamp(-1 + 1e-12, 1 - 1e-12))
    target = torch.cos(theta + m2) - m3
    if straight_through:  # insightface: the margin is a constant offset for autograd
        target = cos + (target - cos).detach()
    if filter_threshold > 0:
        cos = torch.where(~onehot & (cos > filter_threshold), torch.zeros_like(cos), cos)
    return s * torch.where(onehot, target, cos)


def margin_ce(emb, weight, labels, s, m2, m3, **kw) -> torch.Tensor:
    return F.cross_entropy(margin_logits(emb, weight, labels, s, m2, m3, **kw), labels)


def loss_and_grads(emb, weight, labels, s, m2, m3, **kw):
    """float64 loss, dL/demb and dL/dweight."""
    e = emb.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    loss = margin_ce(e, w, labels, s, m2, m3, **kw)
    loss.backward()
    return loss.detach(), e.grad, w.grad


def sgd_steps(weight, batches, s, m2, m3, lr, momentum, weight_decay):
    """torch.optim.SGD on the full float64 matrix; returns (losses, final weight, momentum)."""
    w = torch.nn.Parameter(weight.detach().double().clone())
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for emb, labels in batches:
        opt.zero_grad()
        loss = margin_ce(emb.double(), w, labels, s, m2, m3)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    buf = opt.state[w].get("momentum_buffer") if momentum else None
    return losses, w.detach(), buf


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


PI = math.pi


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs error over max abs reference (scale-free, so tolerances mean digits)."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


class AdaFaceReference:
    """mk-minchul/AdaFace ``head.py`` in float64 on the full matrix: running norm statistics
    (updated by every call of ``logits``) and the norm-adaptive margin on the target column."""

    eps = 1e-3

    def __init__(self, s: float, m: float, h: float, t_alpha: float) -> None:
        self.s, self.m, self.h, self.t_alpha = s, m, h, t_alpha
        self.batch_mean = torch.tensor(20.0, dtype=torch.float64)
        self.batch_std = torch.tensor(100.0, dtype=torch.float64)
        self.scalers: list[torch.Tensor] = []  # each call's margin scalers, for the tests

    def logits(self, emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
        """Scaled logits of raw embeddings ``emb`` (their norms drive the margin)."""
        norms = torch.norm(emb, 2, 1, True)
        cosine = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()
        cosine = cosine.clamp(-1 + self.eps, 1 - self.eps)
        safe_norms = torch.clip(norms, min=0.001, max=100).clone().detach()
        with torch.no_grad():
            mean, std = safe_norms.mean(), safe_norms.std()
            self.batch_mean = mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean
            self.batch_std = std * self.t_alpha + (1 - self.t_alpha) * self.batch_std
        margin_scaler = (safe_norms - self.batch_mean) / (self.batch_std + self.eps)
        margin_scaler = torch.clip(margin_scaler * self.h, -1, 1)
        self.scalers.append(margin_scaler.detach().squeeze(1))
        onehot = torch.zeros_like(cosine).scatter_(1, labels.reshape(-1, 1), 1.0)
        theta = cosine.acos()
        theta_m = torch.clip(
            theta + onehot * (self.m * margin_scaler * -1), self.eps, PI - self.eps
        )
        cosine = theta_m.cos() - onehot * (self.m + self.m * margin_scaler)
        return cosine * self.s

    def loss(self, emb, weight, labels) -> torch.Tensor:
        return F.cross_entropy(self.logits(emb, weight, labels), labels)


def adaface_sgd_steps(weight, steps, ada: AdaFaceReference, lr, momentum, weight_decay):
    """torch.optim.SGD on the full float64 matrix; ``steps`` is a list of optimizer steps, each a
    list of ``(emb, labels)`` micro-batches whose mean loss it minimises. Returns per micro-batch
    losses and dL/demb, per step ``(batch_mean, batch_std)``, the final weight and momentum."""
    w = torch.nn.Parameter(weight.detach().double().clone())
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses, grads, stats = [], [], []
    for micro in steps:
        opt.zero_grad()
        for emb, labels in micro:
            e = emb.detach().double().requires_grad_(True)
            loss = ada.loss(e, w, labels) / len(micro)
            loss.backward()
            losses.append(loss.item() * len(micro))
            grads.append(e.grad * len(micro))
        opt.step()
        stats.append((ada.batch_mean.clone(), ada.batch_std.clone()))
    return losses, grads, stats, w.detach(), opt.state[w]["momentum_buffer"]
