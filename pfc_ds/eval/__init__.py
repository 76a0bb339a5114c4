"""Evaluation: insightface's verification ``.bin`` protocol, IJB-B/C 1:1, and embedding.

``python -m pfc_ds.eval --checkpoint OUT --bin lfw.bin`` evaluates a training checkpoint;
``python -m pfc_ds.eval.ijb`` runs IJB-B/C; ``python -m pfc_ds.embed`` embeds a folder or .rec;
``norm_crop`` aligns a face with its five landmarks as insightface does.
The functions take a model object, so the trainer can evaluate its live backbone.
"""

from pfc_ds.eval.align import norm_crop
from pfc_ds.eval.bins import BinError, BinSet, load_bin, read_bin, synthetic_bin, write_bin
from pfc_ds.eval.embedder import (
    embed_images,
    embed_shard,
    embed_views,
    evaluate_bin,
    gather_embeddings,
    load_checkpoint_model,
    shard_bounds,
)
from pfc_ds.eval.verification import VerificationResult, evaluate

__all__ = [
    "BinError",
    "BinSet",
    "VerificationResult",
    "embed_images",
    "embed_shard",
    "embed_views",
    "evaluate",
    "evaluate_bin",
    "gather_embeddings",
    "load_bin",
    "load_checkpoint_model",
    "norm_crop",
    "read_bin",
    "shard_bounds",
    "synthetic_bin",
    "write_bin",
]
