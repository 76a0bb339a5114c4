"""Vision Transformer for 112x112 faces, as insightface's arcface_torch ``vit.py``.

9x9 patches (144 tokens, no class token), pre-norm blocks with ReLU6 MLPs, optional random token
masking while training, and a flatten-FC-BN-FC-BN feature head. Module and parameter names follow
insightface, so its pretrained ``state_dict`` files load unchanged. Attention runs in float32 even
under fp16, as insightface does, for a stable softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pfc_ds.backbones._common import autocast_fp16, autocast_off, run_maybe_checkpointed
from pfc_ds.backbones.norms import BatchNorm1d, LayerNorm


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with a bias-free qkv projection."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv.float().unbind(0)
        with autocast_off(q):
            p = self.attn_drop if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = out.transpose(1, 2).reshape(b, n, c).to(qkv.dtype)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)), each with drop-path."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, drop: float, drop_path: float
    ) -> None:
        super().__init__()
        self.drop_path = drop_path
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, proj_drop=drop)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected {self.img_size}x{self.img_size} input, got {tuple(x.shape)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT backbone. ``dropout`` is insightface's ``drop_rate`` (positional, MLP and projection
    dropout); ``mask_ratio`` of the tokens are dropped before the blocks while training and
    replaced by a learned ``mask_token`` before the feature head.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        img_size: int = 112,
        patch_size: int = 9,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        mask_ratio: float = 0.1,
        fp16: bool = False,
        gradient_checkpointing: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        self.mask_ratio = mask_ratio
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.num_patches = n = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
        self.pos_drop = nn.Dropout(dropout)
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, dropout, r) for r in rates
        )
        self.norm = LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * n, embed_dim, bias=False),
            BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False),
            BatchNorm1d(embedding_size, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _random_masking(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - mask_ratio`` of each sample's tokens; return them and the unshuffle index."""
        b, n, d = x.shape
        keep = int(n * (1.0 - self.mask_ratio))
        shuffle = torch.argsort(torch.rand(b, n, device=x.device), dim=1)
        restore = torch.argsort(shuffle, dim=1)
        kept = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, d))
        return kept, restore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        restore = None
        with autocast_fp16(x, self.fp16):
            x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
            if self.training and self.mask_ratio > 0:
                x, restore = self._random_masking(x)
            for block in self.blocks:
                x = run_maybe_checkpointed(block, x, self.gradient_checkpointing)
        x = self.norm(x.float() if self.fp16 else x)
        if restore is not None:
            fill = self.mask_token.to(x.dtype).expand(b, self.num_patches - x.shape[1], -1)
            x = torch.cat([x, fill], dim=1)
            x = torch.gather(x, 1, restore[..., None].expand(-1, -1, x.shape[2]))
        return self.feature(x.reshape(b, -1))
