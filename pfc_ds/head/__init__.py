"""Numeric core of pfc_ds: torch and torch.distributed only (no DeepSpeed, no DALI)."""

from pfc_ds.head.adaface import AdaFace
from pfc_ds.head.margins import CombinedMarginLoss
from pfc_ds.head.partial_fc import PartialFC
from pfc_ds.head.sharding import overlaps, shard_range
from pfc_ds.head.sparse_adamw import SparseAdamW
from pfc_ds.head.sparse_sgd import SparseSGD

__all__ = [
    "AdaFace",
    "CombinedMarginLoss",
    "PartialFC",
    "SparseAdamW",
    "SparseSGD",
    "overlaps",
    "shard_range",
]
