"""pfc_ds checkpoints: the on-disk format and its I/O, for the trainer, eval, export and tools.

* ``layout``: names, tags, ``CheckpointRef`` and ``open_checkpoint`` (a user's path -> a
  checkpoint), pruning, setting damaged tags aside;
* ``writer``: the atomic, durable, space-checked ``save``;
* ``reader``: verification, the head shard (resharded exactly), trainer state, fp32 backbone;
* ``restore``: which checkpoint a run resumes from and how its engine comes back;
* ``shard_files`` (head shards streamed to raw files, memory-mapped back), ``integrity``
  (fsync, checksums), ``rng`` (host RNG states), ``comm`` (host-side agreement).

It imports the head (``pfc_ds.head``), torch and DeepSpeed, never the trainer.
"""

from pfc_ds.checkpoint.layout import (
    CheckpointError,
    CheckpointRef,
    head_shard_paths,
    open_checkpoint,
)
from pfc_ds.checkpoint.reader import consolidated_backbone, load_backbone
from pfc_ds.checkpoint.restore import RestoreMode, RestorePlan

__all__ = [
    "CheckpointError",
    "CheckpointRef",
    "RestoreMode",
    "RestorePlan",
    "consolidated_backbone",
    "head_shard_paths",
    "load_backbone",
    "open_checkpoint",
]
