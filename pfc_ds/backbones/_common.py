"""Pieces shared by the backbones: optional fp16 autocast and BatchNorm-safe checkpointing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def autocast_fp16(x: torch.Tensor, enabled: bool) -> AbstractContextManager:
    """insightface's ``fp16`` flag: run the body under float16 autocast on ``x``'s device.

    When off it leaves the caller's autocast state alone rather than forcing autocast off.
    """
    return torch.autocast(x.device.type, dtype=torch.float16) if enabled else nullcontext()


def autocast_off(x: torch.Tensor) -> AbstractContextManager:
    """Suspend autocast on ``x``'s device, for ops that must stay in float32."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return nullcontext()


def run_maybe_checkpointed(module: nn.Module, x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``module(x)``, with activations recomputed in backward when ``enabled`` and training.

    Recomputation re-runs BatchNorm in training mode, which would update its running statistics a
    second time (insightface's checkpointing has this drift); the recompute context restores them.
    """
    if not (enabled and module.training and torch.is_grad_enabled()):
        return module(x)
    contexts = partial(_checkpoint_contexts, module)
    return checkpoint(module, x, use_reentrant=False, context_fn=contexts)


def _checkpoint_contexts(
    module: nn.Module,
) -> tuple[AbstractContextManager, AbstractContextManager]:
    return nullcontext(), _keep_batchnorm_buffers(module)


@contextmanager
def _keep_batchnorm_buffers(module: nn.Module) -> Iterator[None]:
    saved = [
        (buf, buf.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in m.buffers(recurse=False)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
