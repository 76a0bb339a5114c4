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
