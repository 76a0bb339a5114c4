"""Checks made before any step runs, each failing with one line that names the key or path,
and the one change a fresh run makes to its output folder before it writes there.

A run that dies at its first checkpoint, hours in, because the output is read-only, the disk
cannot hold one checkpoint, or the checkpoint it resumed from belongs to another model, wastes
the hours; these checks cost milliseconds at start-up.

An output folder holds one run. A second run into a folder with checkpoints, without
``--resume`` (the flag a user forgets after a crash), used to start from step 0, append its rows
to the first run's ``metrics.jsonl`` and move ``latest`` to its own checkpoints; now it is
refused (``reused_output``) unless it says how to go on: ``--resume`` (or ``train.auto_resume``)
continues, ``--overwrite`` (``train.overwrite``) starts over. A run that starts at step 0 first
moves whatever an earlier run left in the folder to ``OUTPUT/replaced/<time>/``
(``set_aside_previous_run``): moved, not deleted, so a mistaken ``--overwrite`` loses nothing
(a rename, instant for any checkpoint size); the price is the disk space until it is deleted.
"""

from __future__ import annotations

import importlib.util
import os
import time
import uuid
from pathlib import Path

from pfc_ds.checkpoint.layout import CHECKPOINTS, CheckpointRef, candidates
from pfc_ds.train.config import Config, TrainConfig

# What a run writes at the top of its output folder (a fresh run moves these aside).
RUN_FILES = (CHECKPOINTS, "metrics.jsonl", "tensorboard", "wandb", "eval", "backbone.pt",
             "best_backbone.pt")  # fmt: skip
REPLACED = "replaced"


def reused_output(output: Path, t: TrainConfig, *, resume: bool) -> str | None:
    """Why a run may not start in ``output`` as asked, or ``None``: the folder holds a complete
    checkpoint and neither ``resume``/``train.auto_resume`` nor ``train.overwrite`` says
    whether to continue it or start over (``resume`` with ``overwrite`` is refused too).
    Reads only."""
    if resume and t.overwrite:
        return (
            f"--resume continues the run in {output}, --overwrite (train.overwrite: true) "
            "starts it over: pass one of them"
        )
    if resume or t.auto_resume or t.overwrite:
        return None
    found = candidates(output)
    if not found:
        return None
    newest = found[0]
    return (
        f"train.output: {output} already holds a run (newest checkpoint {newest.folder}, step "
        f"{newest.step}): --resume continues it; a new --output, or --overwrite "
        f"(train.overwrite: true), starts over (the old run moves to {output / REPLACED}/)"
    )


def set_aside_previous_run(output: Path) -> Path | None:
    """Move an earlier run's files (``RUN_FILES``) from ``output`` to a new
    ``output/replaced/<YYYYmmdd-HHMMSS>/``; the folder, or ``None`` if there were none. Rank 0
    only, before any rank writes to ``output``; other files in ``output`` stay."""
    present = [output / name for name in RUN_FILES if (output / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = output / REPLACED / stamp
    n = 1
    while target.exists():
        n += 1
        target = output / REPLACED / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for path in present:
        os.replace(path, target / path.name)
    return target


def missing_package(module: str, key: str) -> str | None:
    """``key`` asks for ``module``; why it cannot be had, or ``None`` if it imports."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return f"{key}: true needs the {module} package (pip install {module}), or set {key}: false"


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
