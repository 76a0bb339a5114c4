"""IResNet, the "improved" ResNet of ArcFace, layer for layer as insightface's arcface_torch.

Module and parameter names follow insightface's ``iresnet.py``, so its pretrained ``state_dict``
files load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pfc_ds.backbones._common import autocast_fp16, run_maybe_checkpointed
from pfc_ds.backbones.norms import BatchNorm1d, BatchNorm2d

# Blocks per stage for each depth, as in insightface's iresnet18 ... iresnet200.
IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
_STAGE_WIDTHS = (64, 128, 256, 512)
_FINAL_HW = 7  # 112 / 2**4 after the four stride-2 stages


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN-conv-BN-PReLU-conv-BN residual unit; the stride sits on the second conv."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = BatchNorm2d(in_ch, eps=1e-5)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = BatchNorm2d(out_ch, eps=1e-5)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = BatchNorm2d(out_ch, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                BatchNorm2d(out_ch, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """IResNet for 112x112 faces: stem, four stride-2 stages, then BN-flatten-FC-BN to the embedding.

    The final ``features`` BatchNorm has its scale frozen at 1 (as in insightface), so it only
    centres and whitens the embedding; the head normalises it afterwards.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        *,
        layers: Sequence[int],
        fp16: bool = False,
        gradient_checkpointing: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        in_ch = 64
        for i, (width, blocks) in enumerate(zip(_STAGE_WIDTHS, layers, strict=True)):
            stage = [IBasicBlock(in_ch, width, stride=2)]
            stage += [IBasicBlock(width, width) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            in_ch = width
        self.bn2 = BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * _FINAL_HW * _FINAL_HW, embedding_size)
        self.features = BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def _blocks(self) -> list[nn.Module]:
        return [b for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for b in stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_fp16(x, self.fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            for block in self._blocks():
                x = run_maybe_checkpointed(block, x, self.gradient_checkpointing)
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        x = self.fc(x.float() if self.fp16 else x)
        return self.features(x)
