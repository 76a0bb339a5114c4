"""Which checkpoint a run resumes from and how its engine state can come back: decisions made
before any state is loaded.

The newest checkpoint whose files all verify against ``meta.json`` wins; a damaged one is named,
set aside and the previous one tried. The engine is restored whole when the world size and ZeRO
stage match (or both are stage 0), through DeepSpeed's universal checkpoint when only Adam-style
state must be re-partitioned, and otherwise as consolidated backbone weights with a fresh
optimizer state, which is logged.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pfc_ds.checkpoint import comm
from pfc_ds.checkpoint.layout import (
    CHECKPOINTS,
    DAMAGED,
    META,
    CheckpointError,
    CheckpointRef,
    candidates,
    incomplete,
    set_aside,
)
from pfc_ds.checkpoint.reader import make_universal, verify

log = logging.getLogger("pfc_ds.checkpoint")


class RestoreMode(enum.Enum):
    ENGINE = "engine"  # DeepSpeed's own files, as saved
    UNIVERSAL = "universal"  # DeepSpeed's universal checkpoint, re-partitioned
    WEIGHTS = "weights"  # consolidated backbone weights; a fresh optimizer state


@dataclass(frozen=True)
class RestorePlan:
    """How a checkpoint's engine comes back. ``load_dir`` is what ``engine.load_checkpoint``
    reads (``None`` for ``WEIGHTS``: the weights go into the model before the engine exists)."""

    ref: CheckpointRef
    mode: RestoreMode
    reason: str = ""

    @property
    def load_dir(self) -> Path | None:
        if self.mode is RestoreMode.ENGINE:
            return self.ref.root
        if self.mode is RestoreMode.UNIVERSAL:
            return self.ref.universal.parent
        return None

    def ds_config(self, ds: dict) -> dict:
        """``ds`` as the engine must be built for this plan (a copy)."""
        if self.mode is not RestoreMode.UNIVERSAL:
            return dict(ds)
        return {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}


def pick_checkpoint(output: str | os.PathLike, group=None) -> CheckpointRef | None:
    """The newest complete checkpoint whose files verify; damaged ones are set aside (rank 0).
    Collective. ``CheckpointError`` when there are checkpoints but none is intact."""
    rank = comm.world()[1]
    if rank == 0:
        for folder in incomplete(output):
            log.warning("%s has no %s (a save cut short); not resuming it", folder, META)
    found = candidates(output)
    for ref in found:
        problems = verify(ref, group)
        if not problems:
            return ref
        if rank == 0:
            moved = set_aside(ref.folder)
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            log.warning(
                "checkpoint %s is damaged: %s%s; set aside as %s, trying the previous one",
                ref.tag, problems[0], more, moved.name,
            )  # fmt: skip
        comm.barrier(group)
    if found:
        root = Path(output) / CHECKPOINTS
        raise CheckpointError(
            f"no intact checkpoint in {root}: all {len(found)} failed verification (set aside "
            f"as *{DAMAGED})",
            path=root,
        )
    return None


def plan_restore(ref: CheckpointRef, *, stage: int, world_size: int, optimizer: str) -> RestorePlan:
    """How ``ref``'s engine state comes back at ZeRO ``stage`` on ``world_size`` ranks with the
    backbone's ``optimizer``. May convert to a universal checkpoint (collective)."""
    if ref.world_size == world_size and ref.zero_stage == stage:
        return RestorePlan(ref, RestoreMode.ENGINE)
    if ref.zero_stage == 0 and stage == 0:
        return RestorePlan(ref, RestoreMode.ENGINE)  # stage 0 holds full states
    if ref.zero_stage > 0 and stage > 0 and optimizer == "sgd":
        # ds_to_universal (0.19.8) only knows Adam's exp_avg/exp_avg_sq state.
        reason = "DeepSpeed's universal checkpoint cannot convert SGD momentum"
    elif ref.zero_stage > 0 and stage > 0:
        try:
            make_universal(ref)
            return RestorePlan(ref, RestoreMode.UNIVERSAL)
        except RuntimeError as exc:  # raised on every rank together
            reason = f"universal checkpoint conversion failed ({exc})"
    else:
        reason = f"ZeRO stage changed {ref.zero_stage} -> {stage}"
    log.warning(
        "resuming a ZeRO-%d checkpoint of %d rank(s) at ZeRO-%d on %d rank(s): %s; the "
        "backbone weights are restored exactly but its optimizer state (momentum) is "
        "re-initialised",
        ref.zero_stage, ref.world_size, stage, world_size, reason,
    )  # fmt: skip
    return RestorePlan(ref, RestoreMode.WEIGHTS, reason)
