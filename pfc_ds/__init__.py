"""pfc_ds: Partial FC face-recognition training on DeepSpeed and DALI.

``from pfc_ds import PartialFC, CombinedMarginLoss, AdaFace, SparseSGD, SparseAdamW`` is the head's
public surface. The names load lazily, so a command that needs no torch (the data tools, the
index benchmark's ranks) starts without importing it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pfc_ds.head import (
        AdaFace,
        CombinedMarginLoss,
        PartialFC,
        SparseAdamW,
        SparseSGD,
        shard_range,
    )

__all__ = ["AdaFace", "CombinedMarginLoss", "PartialFC", "SparseAdamW", "SparseSGD", "shard_range"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("pfc_ds.head"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
