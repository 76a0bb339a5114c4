"""Which checkpoint a run resumes from, how its engine state can come back, and what a resume
changes: the decisions before any state is loaded, apart from the loading itself (``Trainer``).

The newest checkpoint whose files all verify against ``meta.json`` wins; a damaged one is named,
set aside and the previous one tried. The engine is restored whole when the world size and ZeRO
stage match (or both are stage 0), through DeepSpeed's universal checkpoint when only Adam-style
state must be re-partitioned, and otherwise as consolidated backbone weights with a fresh
optimizer state, which is logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pfc_ds.train import checkpoint as ckpt
from pfc_ds.train.checkpoint import CheckpointError
from pfc_ds.train.schedule import PolynomialLRWarmup

log = logging.getLogger("pfc_ds.train")

Found = tuple[Path, dict[str, Any]]


def pick_checkpoint(output: Path, rank: int, group=None) -> Found | None:
    """The newest complete checkpoint whose files verify; damaged ones are set aside."""
    if rank == 0:
        for folder in ckpt.incomplete(output):
            log.warning("%s has no %s (a save cut short); not resuming it", folder, ckpt.META)
    found = ckpt.candidates(output)
    for folder, meta in found:
        problems = ckpt.verify(folder, meta, group)
        if not problems:
            return folder, meta
        if rank == 0:
            moved = ckpt.set_aside(folder)
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            log.warning(
                "checkpoint %s is damaged: %s%s; set aside as %s, trying the previous one",
                folder.name,
                problems[0],
                more,
                moved.name,
            )
        ckpt.barrier(group)
    if found:
        raise CheckpointError(
            f"no intact checkpoint in {output / ckpt.CHECKPOINTS}: all {len(found)} "
            f"failed verification (set aside as *{ckpt.DAMAGED})"
        )
    return None


def plan_restore(
    found: Found,
    stage: int,
    ds: dict,
    model: torch.nn.Module,
    *,
    world_size: int,
    optimizer: str,
) -> str:
    """``engine``, ``universal`` or ``weights``: how the engine comes back. ``universal`` adds
    ``load_universal`` to ``ds``; ``weights`` loads the backbone into ``model`` before init."""
    folder, meta = found
    if meta["world_size"] == world_size and meta["zero_stage"] == stage:
        return "engine"
    if meta["zero_stage"] == 0 and stage == 0:
        return "engine"  # stage-0 checkpoints hold full model and optimizer states
    if meta["zero_stage"] > 0 and stage > 0 and optimizer == "sgd":
        # ds_to_universal (0.19.8) only knows Adam's exp_avg/exp_avg_sq state.
        reason = "DeepSpeed's universal checkpoint cannot convert SGD momentum"
    elif meta["zero_stage"] > 0 and stage > 0:
        try:
            ckpt.make_universal(folder)
            ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
            return "universal"
        except RuntimeError as exc:  # raised on every rank together
            reason = f"universal checkpoint conversion failed ({exc})"
    else:
        reason = f"ZeRO stage changed {meta['zero_stage']} -> {stage}"
    log.warning(
        "resuming a ZeRO-%d checkpoint of %d rank(s) at ZeRO-%d on %d rank(s): %s; the "
        "backbone weights are restored exactly but its optimizer state (momentum) is "
        "re-initialised",
        meta["zero_stage"],
        meta["world_size"],
        stage,
        world_size,
        reason,
    )
    model.load_state_dict(ckpt.consolidated_backbone(folder, meta), strict=True)
    return "weights"


def schedule_state(schedule: PolynomialLRWarmup) -> dict[str, Any]:
    s = schedule
    return {"warmup_steps": s.warmup_steps, "total_steps": s.total_steps, "power": s.power}


def warn_changed_run(
    meta: dict[str, Any],
    saved: dict[str, Any] | None,
    schedule: PolynomialLRWarmup,
    *,
    step: int,
    lr: float,
    global_batch: int,
    world_size: int,
    batch_size: int,
    grad_accum: int,
) -> None:
    """A resume that silently changes the LR curve or the global batch is a different run."""
    if meta.get("global_batch", global_batch) != global_batch:
        log.warning(
            "resume changes the global batch %d -> %d (world size %d -> %d, batch %d x "
            "accum %d per rank); the LR is not rescaled",
            meta["global_batch"],
            global_batch,
            meta["world_size"],
            world_size,
            batch_size,
            grad_accum,
        )
    now = schedule_state(schedule)
    if saved is not None and saved != now:
        before = PolynomialLRWarmup(**saved).factor(step) * lr
        after = schedule.factor(step) * lr
        log.warning(
            "resume changes the LR schedule %s -> %s (train.max_steps, train.epochs, "
            "optim.warmup_epochs or the steps per epoch changed): the LR of step %d jumps "
            "from %.4g to %.4g",
            saved,
            now,
            step + 1,
            before,
            after,
        )
