"""Checks made before any step runs, each failing with one line that names the key or path.

A run that dies at its first checkpoint, hours in, because the output is read-only, the disk
cannot hold one checkpoint, or the checkpoint it resumed from belongs to another model, wastes
the hours; these checks cost milliseconds at start-up.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import torch

from pfc_ds.train.config import Config


def unwritable(output: Path) -> str | None:
    """Why ``train.output`` cannot hold the run's files, or ``None`` (creates the folder)."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write_probe_{uuid.uuid4().hex}"
        with open(probe, "wb") as f:
            f.write(b"x")
        probe.unlink()
    except OSError as exc:
        return (
            f"train.output: {output} is not writable ({type(exc).__name__}: {exc.strerror or exc})"
        )
    return None


def resume_mismatch(meta: dict[str, Any], folder: Path, cfg: Config) -> str | None:
    """A checkpoint the config cannot continue (another model or head shape), or ``None``.

    A different world size is fine (the head is resharded exactly); a different
    ``data.num_classes`` would change every rank's rows, and a different embedding size or
    backbone would not load at all.
    """
    for key, saved, now in (
        ("model.backbone", meta.get("backbone"), cfg.model.backbone),
        ("model.embedding_size", meta.get("embedding_size"), cfg.model.embedding_size),
        ("data.num_classes", meta.get("num_classes"), cfg.data.num_classes),
    ):
        if saved is not None and now is not None and saved != now:
            return (
                f"{key}={now!r} but the checkpoint {folder} was trained with {saved!r}: "
                f"set {key}: {saved!r} to resume it, or use another train.output"
            )
    return None


_OPTIMIZER_STATES = {"sgd": 1, "adamw": 2}  # fp32 tensors per parameter in the optimizer
_PER_RANK_BYTES = 20 << 10  # trainer state (RNG states, data position), head shard's .pt


def checkpoint_bytes(engine, head, optim_name: str, momentum: float, *, rank: int) -> int:
    """This rank's estimate of one checkpoint's bytes on disk, all ranks together (sum it).

    Head: this rank's row tensors as they are stored, plus 20 KB of trainer state. Backbone
    (counted on rank 0): the module's parameters in their dtype, fp32 masters under fp16/bf16,
    and the optimizer's state tensors.
    """
    from pfc_ds.train.shard_files import ROW_KEYS

    state = head.state_dict()
    total = _PER_RANK_BYTES + sum(
        t.numel() * t.element_size()
        for k in ROW_KEYS
        if isinstance(t := state.get(k), torch.Tensor)
    )
    if rank == 0:
        params = [p for p in engine.module.parameters() if p.requires_grad]
        numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
        item = params[0].element_size() if params else 4
        states = _OPTIMIZER_STATES.get(optim_name, 2) if momentum or optim_name != "sgd" else 0
        total += numel * (item + (4 if item < 4 else 0) + 4 * states)
    return total
