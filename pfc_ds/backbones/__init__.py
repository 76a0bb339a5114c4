"""Face-recognition backbones (torch only) and the name registry the trainer builds them from.

Every backbone maps a (B, 3, 112, 112) batch to a raw (B, embedding_size) embedding; the Partial FC
head normalises it. Architectures match insightface's arcface_torch, and insightface's network names
(``r50``, ``mbf``, ``vit_b_dp005_mask_005``, ...) are registered as aliases so its configs carry over.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from pfc_ds.backbones.iresnet import IRESNET_LAYERS, IResNet
from pfc_ds.backbones.mobilefacenet import MobileFaceNet
from pfc_ds.backbones.tiny import TinyNet
from pfc_ds.backbones.vit import VisionTransformer

__all__ = [
    "BackboneSpec",
    "IResNet",
    "MobileFaceNet",
    "TinyNet",
    "VisionTransformer",
    "available_backbones",
    "get_backbone",
    "register_backbone",
]


@dataclass(frozen=True)
class BackboneSpec:
    """How a registered name builds its model.

    ``build(embedding_size, fp16=, gradient_checkpointing=, dropout=, **arch, **options)``;
    ``arch`` is fixed by the name, ``options`` are defaults that callers may override through
    ``get_backbone(**kwargs)``. Any other keyword is rejected.
    """

    build: Callable[..., nn.Module]
    arch: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(name: str, spec: BackboneSpec) -> None:
    """Add ``name`` to the registry; re-registering a name is an error, not a silent override."""
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = spec


def available_backbones() -> Mapping[str, BackboneSpec]:
    """Read-only view of the registry, name -> spec."""
    return MappingProxyType(_REGISTRY)


def get_backbone(
    name: str,
    embedding_size: int = 512,
    *,
    fp16: bool = False,
    gradient_checkpointing: bool = False,
    dropout: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """Build the backbone registered as ``name``, producing ``embedding_size``-dim raw embeddings.

    ``fp16`` runs the body under float16 autocast (insightface's flag; unneeded when DeepSpeed
    already casts the model). ``gradient_checkpointing`` recomputes each block in backward.
    ``kwargs`` override the name's options (e.g. ``mask_ratio`` for ViTs, ``width`` for ``tiny``).
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(sorted(_REGISTRY))}")
    unknown = sorted(set(kwargs) - set(spec.options))
    if unknown:
        allowed = ", ".join(sorted(spec.options)) or "none"
        raise ValueError(f"backbone {name!r} got unknown options {unknown}; allowed: {allowed}")
    if not isinstance(embedding_size, int) or embedding_size <= 0:
        raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return spec.build(
        embedding_size,
        fp16=fp16,
        gradient_checkpointing=gradient_checkpointing,
        dropout=dropout,
        **spec.arch,
        **{**spec.options, **kwargs},
    )


def _register_builtins() -> None:
    for depth, layers in IRESNET_LAYERS.items():
        spec = BackboneSpec(IResNet, arch={"layers": layers})
        register_backbone(f"iresnet{depth}", spec)
        register_backbone(f"r{depth}", spec)

    mbf = BackboneSpec(MobileFaceNet, arch={"blocks": (1, 4, 6, 2), "scale": 2})
    mbf_large = BackboneSpec(MobileFaceNet, arch={"blocks": (2, 8, 12, 4), "scale": 4})
    for name, spec in {
        "mobilefacenet": mbf,
        "mbf": mbf,
        "mobilefacenet_large": mbf_large,
        "mbf_large": mbf_large,
    }.items():
        register_backbone(name, spec)

    # (embed_dim, depth, drop_path_rate, mask_ratio) from insightface's get_model; all use 8 heads.
    vits = {
        "vit_t": (256, 12, 0.1, 0.1),
        "vit_t_dp005_mask0": (256, 12, 0.05, 0.0),
        "vit_s": (512, 12, 0.1, 0.1),
        "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0),
        "vit_b": (512, 24, 0.1, 0.1),
        "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05),
        "vit_l": (768, 24, 0.05, 0.05),  # insightface only ships vit_l_dp005_mask_005
        "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05),
    }
    for name, (dim, depth, dpr, mask) in vits.items():
        arch = {"embed_dim": dim, "depth": depth, "num_heads": 8}
        options = {"drop_path_rate": dpr, "mask_ratio": mask}
        register_backbone(name, BackboneSpec(VisionTransformer, arch=arch, options=options))

    register_backbone("tiny", BackboneSpec(TinyNet, options={"width": 16}))


_register_builtins()
