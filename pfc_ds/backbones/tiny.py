"""A cheap backbone for tests and the CPU demo.

It has no batch statistics (no BatchNorm): each sample's embedding depends only on that sample, so
a data-parallel step over W ranks matches a single-process step on the concatenated batch. That is
what the trainer's world-size-equivalence tests rely on.
"""

from __future__ import annotations

import torch
from torch import nn

from pfc_ds.backbones._common import autocast_fp16, run_maybe_checkpointed


class TinyNet(nn.Module):
    """Three strided convs (112 -> 28 -> 14 -> 7), 2x2 average pool, linear; ~155k params at
    ``width=16`` and embedding 512.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        *,
        width: int = 16,
        fp16: bool = False,
        gradient_checkpointing: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, kernel_size=4, stride=4),
            nn.GELU(),
            nn.Conv2d(w, 2 * w, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(16 * w, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_fp16(x, self.fp16):
            x = self.dropout(run_maybe_checkpointed(self.body, x, self.gradient_checkpointing))
        return self.fc(x.float() if self.fp16 else x)
