"""Verification sets scored while training, over all ranks.

Every rank embeds an equal slice of each set through the engine's module (so ZeRO-3's
parameter gathering sees the same forwards everywhere), one all-gather assembles the
embeddings, and every rank scores them with insightface's protocol (cheap, deterministic), so
no rank waits in a collective while rank 0 works alone. Sets are read at startup: a missing or
unreadable ``.bin`` is a config error naming the path before step 1, never at step 2000.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pfc_ds.eval.bins import BinError, BinSet, load_bin, write_bin
from pfc_ds.eval.embedder import embed_shard, gather_embeddings
from pfc_ds.eval.verification import VerificationResult, evaluate
from pfc_ds.train.config import Config, ConfigError

log = logging.getLogger("pfc_ds.train")

SYNTHETIC_BIN = "eval/synthetic.bin"


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def source_heldout_bin(cfg: Config, output: Path) -> Path:
    """Write the held-out pairs of the synthetic source as a ``.bin``: insightface's format,
    with lossless PNGs (JPEG's chroma subsampling would blur the small colour cells)."""
    from pfc_ds.train.synthetic import heldout_pairs

    d = cfg.data
    images, issame = heldout_pairs(
        cfg.eval.synthetic_pairs, first_class=d.num_classes, image_size=d.image_size, seed=d.seed
    )
    encoded = [_png(img) for img in images.numpy()]
    return write_bin(output / SYNTHETIC_BIN, encoded, issame.numpy())


class Evaluator:
    """Loads the sets once and scores the engine's backbone on them."""

    def __init__(self, cfg: Config, output: Path, rank: int) -> None:
        self.cfg = cfg.eval
        paths = [Path(p) for p in self.cfg.sets]
        if self.cfg.synthetic_pairs:
            path = output / SYNTHETIC_BIN
            if rank == 0:
                source_heldout_bin(cfg, output)
            if dist.is_initialized():
                dist.barrier()
            paths.append(path)
        self.sets: list[BinSet] = []
        for path in paths:
            try:
                self.sets.append(load_bin(path, cfg.data.image_size))
            except (BinError, OSError) as exc:
                raise ConfigError(f"eval.sets: {exc}") from exc
        self.rank = rank
        self.best: dict[str, float] = {}
        self.best_mean = -1.0
        self.history: list[dict[str, Any]] = []  # every evaluation's metrics

    def __bool__(self) -> bool:
        return bool(self.sets)

    def due(self, step: int, end: int) -> bool:
        every = self.cfg.every
        return bool(self.sets) and (step == end or (every > 0 and step % every == 0))

    @torch.no_grad()
    def run(self, engine) -> dict[str, VerificationResult]:
        """Score every set (collective: every rank calls it at the same step)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        module, device = engine.module, engine.device
        results = {}
        for s in self.sets:
            local = embed_shard(module, s.images, rank, world, self.cfg.batch_size, device)
            if world > 1:
                emb = gather_embeddings(torch.from_numpy(local).to(device), len(s.images))
                emb = emb.cpu().numpy()
            else:
                emb = local
            results[s.name] = evaluate(emb.astype(np.float64), s.issame)
        return results

    def evaluate(self, engine, step: int, logger) -> bool:
        """Score (collective), log to ``metrics.jsonl`` and, on rank 0, one line; whether the
        mean accuracy is a new best."""
        results = self.run(engine)
        metrics, improved = self.record(step, results)
        self.history.append(metrics)
        logger.write(metrics, tensorboard_prefix="")
        if self.rank == 0:
            print(format_results(step, results), file=logger.stream, flush=True)
        return improved

    def record(self, step: int, results: dict[str, VerificationResult]) -> tuple[dict, bool]:
        """Metrics (``eval/<set>/<field>``, best so far) and whether the mean accuracy is a
        new best."""
        metrics: dict[str, Any] = {"step": step}
        for name, r in results.items():
            for key, value in asdict(r).items():
                metrics[f"eval/{name}/{key}"] = value
            self.best[name] = max(self.best.get(name, 0.0), r.accuracy)
            metrics[f"eval/{name}/best_accuracy"] = self.best[name]
        mean = float(np.mean([r.accuracy for r in results.values()]))
        improved = mean > self.best_mean
        self.best_mean = max(self.best_mean, mean)
        return metrics, improved


def format_results(step: int, results: dict[str, VerificationResult]) -> str:
    parts = [
        f"{name} {r.accuracy:.4f} ± {r.accuracy_std:.4f} (TAR@FAR=1e-3 {r.tar_at_far:.4f})"
        for name, r in results.items()
    ]
    return f"eval step {step}: " + ", ".join(parts)
