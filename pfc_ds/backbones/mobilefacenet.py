"""MobileFaceNet as in insightface's arcface_torch (``mbf`` and ``mbf_large``).

Module and parameter names follow insightface's ``mobilefacenet.py`` (nested ``layers``
containers included), so its pretrained ``state_dict`` files load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pfc_ds.backbones._common import autocast_fp16, run_maybe_checkpointed
from pfc_ds.backbones.norms import BatchNorm1d, BatchNorm2d

_Pair = tuple[int, int]


class ConvBlock(nn.Module):
    """Conv-BN-PReLU."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: _Pair = (1, 1),
        stride: _Pair = (1, 1),
        padding: _Pair = (0, 0),
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
            BatchNorm2d(out_ch),
            nn.PReLU(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv-BN with no activation (the linear bottleneck)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: _Pair = (1, 1),
        stride: _Pair = (1, 1),
        padding: _Pair = (0, 0),
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
            BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``hidden``, depthwise kxk, 1x1 linear project."""

    def __init__(
        self, in_ch: int, out_ch: int, hidden: int, stride: _Pair, residual: bool = False
    ) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_ch, hidden),
            ConvBlock(hidden, hidden, (3, 3), stride, (1, 1), groups=hidden),
            LinearBlock(hidden, out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` shape-preserving residual bottlenecks."""

    def __init__(self, channels: int, num_block: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(
                DepthWise(channels, channels, hidden, (1, 1), residual=True)
                for _ in range(num_block)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv over the 7x7 map, then a bias-free linear and BatchNorm."""

    def __init__(self, embedding_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, kernel=(7, 7), groups=512),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet; ``blocks=(1, 4, 6, 2), scale=2`` is insightface ``mbf``, ``(2, 8, 12, 4), 4``
    is ``mbf_large``. The bottleneck widths (128/256/512) do not scale, as in insightface.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        *,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        fp16: bool = False,
        gradient_checkpointing: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dropout:
            raise ValueError(
                f"mobilefacenet has no dropout layer (as in insightface); got {dropout}"
            )
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        c1, c2 = 64 * scale, 128 * scale
        if blocks[0] == 1:
            stage1: nn.Module = ConvBlock(c1, c1, (3, 3), (1, 1), (1, 1), groups=64)
        else:
            stage1 = Residual(c1, blocks[0], hidden=128)
        self.layers = nn.ModuleList(
            [
                ConvBlock(3, c1, (3, 3), (2, 2), (1, 1)),
                stage1,
                DepthWise(c1, c1, hidden=128, stride=(2, 2)),
                Residual(c1, blocks[1], hidden=128),
                DepthWise(c1, c2, hidden=256, stride=(2, 2)),
                Residual(c2, blocks[2], hidden=256),
                DepthWise(c2, c2, hidden=512, stride=(2, 2)),
                Residual(c2, blocks[3], hidden=256),
            ]
        )
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_fp16(x, self.fp16):
            for layer in self.layers:
                x = run_maybe_checkpointed(layer, x, self.gradient_checkpointing)
        x = self.conv_sep(x.float() if self.fp16 else x)
        return self.features(x)
