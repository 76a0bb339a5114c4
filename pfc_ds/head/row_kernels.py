"""The row-sparse SGD update as one compiled CPU pass per row, where a C++ compiler is present.

The eager update (``SparseSGD``'s fallback) makes about twenty passes over the window's
``S x D`` rows: fold the normalisation's coefficient and the weight decay into the gradient,
scale and add the momentum, step the weight, check the result, gather and scatter the
momentum and the weight, and for half storage round and convert. ``csrc/row_sgd.cpp`` reads
each row's weight, gradient and momentum once and writes weight and momentum once (into the
bank directly, for a device bank, rounding fp16/bf16 with ``rounding``'s bits), with the finite
check in the same pass. At 1M ids x 512 and 100k sampled rows on two cores the update takes a
quarter of the eager time (``BENCHMARKS.md``).

The kernel is one of the head's compiled CPU kernels (``cpu_kernels``: built once per venv,
eager fallback where it cannot be); CUDA runs the eager ops.

Both kernels compute the same arithmetic element by element (contraction into FMAs is off), and
the scatter's stochastic rounding reproduces ``rounding.stochastic_round`` bit for bit, so a bank
updated block by block in place and then written by the bank (host and disk banks) and a device
bank updated by the scatter stay bit-identical to each other, as the eager paths do.
"""

from __future__ import annotations

import torch

from pfc_ds.head.bank import DirectRows
from pfc_ds.head.cpu_kernels import load


def _scale(scale: torch.Tensor | float) -> torch.Tensor:
    # A CPU 0-dim tensor; the kernel reads its value (a CPU read, no device sync).
    return scale if isinstance(scale, torch.Tensor) else torch.full((), float(scale))


def _on(on: torch.Tensor) -> torch.Tensor:
    return on.reshape(-1)


def sgd_block_(
    weight: torch.Tensor,
    grad: torch.Tensor,
    momentum: torch.Tensor | None,
    coef: torch.Tensor,
    on: torch.Tensor,
    scale: torch.Tensor | float,
    lr: float,
    mom: float,
    wd: float,
) -> None:
    """Update ``weight`` and ``momentum`` (fp32 rows, contiguous) in place from ``grad +
    coef * weight`` loss-scaled by ``scale``; rows where ``on`` (per row, or one value) is 0
    are left alone and their gradient not read."""
    empty = torch.empty(0)
    load().sgd_block(
        weight, grad, empty if momentum is None else momentum, coef, _on(on), _scale(scale),
        lr, mom, wd,
    )  # fmt: skip


def sgd_scatter(
    bank: DirectRows,
    index: torch.Tensor,
    weight: torch.Tensor,
    grad: torch.Tensor,
    coef: torch.Tensor,
    on: torch.Tensor,
    scale: torch.Tensor | float,
    lr: float,
    mom: float,
    wd: float,
) -> torch.Tensor:
    """As ``sgd_block_``, reading the window's fp32 rows ``weight`` and writing the new weights
    and momenta straight into the bank's tensors (``bank.tensors``: weight, then momentum if
    ``mom``) at the distinct local rows ``index``: fp32 as computed, fp16/bf16 stochastically
    rounded with the bits ``rounding.stochastic_round`` would use (``bank.keys``). Returns a
    0-dim bool: every new weight and momentum is within its storage dtype's finite range."""
    weights, momenta = bank.tensors[0], bank.tensors[1] if mom else torch.empty(0)
    (w0, w1), (m0, m1) = bank.keys[0], bank.keys[1] if mom else (0, 0)
    return load().sgd_scatter(
        weights, momenta, index, weight, grad, coef, _on(on), _scale(scale), lr, mom, wd,
        bank.row_offset, [w0, w1, m0, m1],
    )  # fmt: skip
