"""pfc_ds: Partial FC face-recognition training on DeepSpeed and DALI."""

from pfc_ds.head import CombinedMarginLoss, PartialFC, SparseAdamW, SparseSGD, shard_range

__all__ = ["CombinedMarginLoss", "PartialFC", "SparseAdamW", "SparseSGD", "shard_range"]
