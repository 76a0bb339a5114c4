"""Checks made before any step runs, each failing with one line that names the key or path.

A run that dies at its first checkpoint, hours in, because the output is read-only, the disk
cannot hold one checkpoint, or the checkpoint it resumed from belongs to another model, wastes
the hours; these checks cost milliseconds at start-up.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from pfc_ds.checkpoint.layout import CheckpointRef
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


def resume_mismatch(ref: CheckpointRef, cfg: Config, num_classes: int) -> str | None:
    """A checkpoint the config cannot continue (another model or head shape), or ``None``.
    ``num_classes``: the head's class count (``data.num_classes`` or the data set's own).

    A different world size is fine (the head is resharded exactly); a different
    ``data.num_classes`` would change every rank's rows, and a different embedding size or
    backbone would not load at all.
    """
    meta, folder = ref.meta, ref.folder
    for key, saved, now in (
        ("model.backbone", meta.get("backbone"), cfg.model.backbone),
        ("model.embedding_size", meta.get("embedding_size"), cfg.model.embedding_size),
        ("data.num_classes", meta.get("num_classes"), num_classes),
    ):
        if saved is not None and now is not None and saved != now:
            return (
                f"{key}={now!r} but the checkpoint {folder} was trained with {saved!r}: "
                f"set {key}: {saved!r} to resume it, or use another train.output"
            )
    return None
