"""torch's GPU switches for face-recognition training, set once per process from the config.

* ``cudnn.benchmark``: face crops have one fixed size, so cuDNN's autotuner picks the fastest
  convolution algorithms once and reuses them every step.
* TF32 (``train.tf32``, default on): fp32 matmuls and convolutions on tensor cores, 10 mantissa
  bits in the products and fp32 sums, as insightface runs its fp32 configs on Ampere and later.
* ``train.deterministic``: torch's deterministic algorithms and cuDNN without autotuning, so a
  run repeats bit for bit on the same GPU type and software (the head's stochastic rounding is
  counter-based and repeats anyway). Ops without a deterministic kernel warn instead of
  stopping the run (DeepSpeed's own kernels among them).
"""

from __future__ import annotations

import os

import torch


def configure(*, tf32: bool, deterministic: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        # cuBLAS needs a fixed workspace to repeat its reductions (read at its first use).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
