"""Normalisation layers that compute in float32 whatever dtype the model is cast to.

DeepSpeed's fp16/bf16 modes cast a model's parameters to the half dtype but leave its buffers
alone, so a stock ``nn.BatchNorm2d`` meets a half input, half weights and fp32 running statistics,
and ``F.batch_norm`` refuses the mix. Even where it would run, batch statistics and LayerNorm's
variance lose precision in half. These layers do what torch autocast does for norms: upcast the
input and the affine parameters, normalise in fp32 against fp32 statistics, and hand the result
back in the input's dtype. Names and ``state_dict`` keys are the stock layers', so insightface
weights load unchanged; in fp32 they are the stock layers exactly.

On a GPU the kernels normalise a half input in fp32 themselves (cuDNN's batch norm takes fp32
weight, bias and statistics beside it; torch's layer norm accumulates in fp32 with affine
parameters of the input's dtype), so the input is not upcast there: an upcast copy would double
the activation memory backward keeps. The CPU path upcasts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


class _Fp32BatchNorm(nn.modules.batchnorm._BatchNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half_params = self.weight is not None and self.weight.dtype != torch.float32
        if x.dtype == torch.float32 and not half_params:
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average (never used by the backbones)
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        mixed = x.is_cuda and x.dtype != torch.float32  # half input, fp32 rest: one kernel
        y = F.batch_norm(
            x if mixed else x.float(),
            self.running_mean if track else None,
            self.running_var if track else None,
            _fp32(self.weight),
            _fp32(self.bias),
            use_batch_stats,
            momentum,
            self.eps,
        )
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # ``module.half()`` casts buffers too; the running statistics stay fp32 regardless.
        super()._apply(fn, recurse)
        for name in ("running_mean", "running_var"):
            buf = getattr(self, name)
            if buf is not None and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self


class BatchNorm1d(_Fp32BatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that normalises in fp32 (see the module docstring)."""


class BatchNorm2d(_Fp32BatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that normalises in fp32 (see the module docstring)."""


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that normalises in fp32, as autocast runs it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half_params = self.weight is not None and self.weight.dtype != torch.float32
        if x.dtype == torch.float32 and not half_params:
            return super().forward(x)
        if x.is_cuda and x.dtype != torch.float32:  # fp32 accumulation inside the kernel
            w, b = (None if t is None else t.to(x.dtype) for t in (self.weight, self.bias))
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
        y = F.layer_norm(
            x.float(), self.normalized_shape, _fp32(self.weight), _fp32(self.bias), self.eps
        )
        return y.to(x.dtype)
