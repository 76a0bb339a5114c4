"""``Checkpointer``: the trainer's checkpoint policy: resume, save, space, pruning, rollback
targets and ``backbone.pt``.

The format and its I/O are ``pfc_ds.checkpoint``'s; this component decides *when* and *what*:
a save at ``train.save_every`` steps and at the end, refused before the first step when one
checkpoint cannot fit (``train.save_failure``: ``error`` stops, ``warn`` trains on), the newest
``train.keep_last`` tags kept plus the one resumed from, and the last good checkpoint as the
rollback target. It is handed what it saves and returns what it loads; it never calls back
into the trainer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pfc_ds.checkpoint import comm
from pfc_ds.checkpoint.layout import CheckpointError, CheckpointRef, checkpoints_root
from pfc_ds.checkpoint.reader import load_head, load_trainer_state
from pfc_ds.checkpoint.restore import RestoreMode, RestorePlan, pick_checkpoint, plan_restore
from pfc_ds.checkpoint.rng import set_rng_state
from pfc_ds.checkpoint.shard_files import atomic_save
from pfc_ds.checkpoint.writer import FileHooks, estimate_bytes, save, size_text, space_short
from pfc_ds.head import seeds
from pfc_ds.train import preflight
from pfc_ds.train.config import Config, ConfigError, TrainConfig
from pfc_ds.train.faults import Faults
from pfc_ds.train.schedule import PolynomialLRWarmup

log = logging.getLogger("pfc_ds.train")

MAX_ROLLBACKS = 3  # rollbacks in a row to one checkpoint before the run stops anyway


class Checkpointer:
    def __init__(
        self,
        output: Path,
        t: TrainConfig,
        *,
        rank: int,
        group=None,
        faults: Faults | None = None,
    ) -> None:
        self.output, self.cfg, self.rank, self.group = output, t, rank, group
        self.faults = faults
        self.root = checkpoints_root(output)
        self.last_good: CheckpointRef | None = None  # saved or resumed from: the rollback target
        self.loaded_tag: str | None = None  # resumed from: never pruned by this run
        self.need_bytes = 0  # one checkpoint's size: estimated, then as last written
        self.estimated = 0  # the estimate alone
        self._space_checked = False

    # ---- resume --------------------------------------------------------------------------

    def find(self, resume: bool) -> CheckpointRef | None:
        """With ``resume``: the checkpoint to resume, the newest that verifies. Without: refuse
        a folder holding a run unless ``train.overwrite`` (launches that bypass train.sh's
        pre-check get the same line), and move an earlier run's files aside, so two runs never
        mix in one folder. Collective."""
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart and not resume and self.rank == 0:
            log.warning("torchrun restart %d without --resume or train.auto_resume: training "
                        "starts over from step 0", restart)  # fmt: skip
        self._agree(preflight.reused_output(self.output, self.cfg, resume=resume))
        if resume:
            return pick_checkpoint(self.output, self.group)
        self._agree(self._set_aside_previous_run() if self.rank == 0 else None)
        return None

    def _agree(self, problem: str | None) -> None:
        first = next((p for p in comm.gather_objects(problem, self.group) if p), None)
        if first is not None:
            raise ConfigError(first)

    def _set_aside_previous_run(self) -> str | None:
        """Rank 0: move an earlier run's files aside (logged); a problem, or ``None``."""
        try:
            moved = preflight.set_aside_previous_run(self.output)
        except OSError as exc:
            return f"train.output: cannot move the earlier run in {self.output} aside ({exc})"
        if moved is not None:
            log.warning("starting over in %s: the earlier run's files are now in %s (delete it "
                        "to free the space)", self.output, moved)  # fmt: skip
        return None

    @staticmethod
    def plan(ref: CheckpointRef, *, stage: int, world_size: int, optimizer: str) -> RestorePlan:
        return plan_restore(ref, stage=stage, world_size=world_size, optimizer=optimizer)

    def restore(self, plan: RestorePlan, engine, head, *, seed: int) -> dict[str, Any]:
        """Load ``plan``'s engine state (unless ``WEIGHTS``, loaded before the engine), this
        rank's head shard and host RNGs; returns the trainer state to continue from."""
        ref = plan.ref
        if plan.mode is not RestoreMode.WEIGHTS:
            path, _ = engine.load_checkpoint(
                str(plan.load_dir), tag=ref.tag, load_lr_scheduler_states=False
            )
            if path is None:
                raise FileNotFoundError(
                    f"DeepSpeed found no checkpoint in {plan.load_dir}/{ref.tag}"
                )
        load_head(head, ref, seed=seeds.resharded_base(seed, ref.step))
        state = load_trainer_state(ref)
        if "rng" in state:
            set_rng_state(state["rng"])
        else:  # another world size: fresh, step-dependent streams
            torch.manual_seed(seeds.backbone(seed, self.rank, ref.step))
        self.last_good = ref
        self.loaded_tag = self.loaded_tag or ref.tag
        if self.rank == 0:
            log.info(
                "resumed from %s at step %d (%s restore)", ref.folder, ref.step, plan.mode.value
            )
        return state

    # ---- save ----------------------------------------------------------------------------

    def estimate(self, engine, head, optim_name: str, momentum: float) -> None:
        """One checkpoint's bytes: estimated over the ranks, or the resumed one's if larger."""
        mine = estimate_bytes(engine, head, optim_name, momentum, rank=self.rank)
        need = self.estimated = sum(comm.gather_objects(mine, self.group))
        self.need_bytes = max(need, self.last_good.bytes if self.last_good else 0)

    def check_space(self) -> None:
        """Before the first step of a run that saves: room for one checkpoint."""
        if self._space_checked:
            return
        self._space_checked = True
        short = space_short(self.root, self.need_bytes, self.group)
        if short is None:
            return
        message = (
            f"train.output: {size_text(short[1])} free on {self.root} (rank {short[0]}), one "
            f"checkpoint needs about {size_text(self.need_bytes)}"
        )
        if self.cfg.save_failure == "error":
            raise CheckpointError(
                message + " (train.save_failure: warn trains on without saving)",
                path=self.root, free=short[1], need=self.need_bytes, rank=short[0],
            )  # fmt: skip
        if self.rank == 0:
            log.warning("%s; training anyway (train.save_failure: warn)", message)

    def due(self, step: int, end: int) -> bool:
        every = self.cfg.save_every
        return step == end or bool(every and step % every == 0)

    def save(
        self,
        step: int,
        engine,
        head,
        state: dict[str, Any],
        meta: dict[str, Any],
        beat: Callable[[str], None] | None = None,
    ) -> CheckpointRef | None:
        """Checkpoint ``step`` (collective); ``None`` if it could not be written and
        ``train.save_failure`` is ``warn``. ``beat``: called after every file (a watchdog)."""
        try:
            ref = save(
                engine, head, state, self.output, step, meta,
                keep_last=self.cfg.keep_last, need_bytes=int(self.need_bytes * 1.05),
                protect=(self.loaded_tag,) if self.loaded_tag else (), group=self.group,
                hooks=self._hooks(step, beat),
            )  # fmt: skip
        except CheckpointError as exc:
            if self.cfg.save_failure == "error":
                raise CheckpointError(
                    f"{exc}; the previous checkpoint {self.last_good and self.last_good.folder} "
                    "is intact (train.save_failure: warn trains on)",
                    path=exc.path, free=exc.free, need=exc.need, rank=exc.rank,
                ) from exc  # fmt: skip
            if self.rank == 0:
                log.warning("%s; training on (train.save_failure: warn)", exc)
            return None
        self.last_good = ref
        self.need_bytes = ref.bytes or self.need_bytes
        return ref

    def _hooks(self, step: int, beat: Callable[[str], None] | None) -> FileHooks:
        faults = self.faults

        def before(path: Path) -> None:
            if faults is not None:
                faults.before_file(path, step)

        def after(path: Path) -> None:
            if beat is not None:
                beat(f"in the checkpoint of step {step}")
            if faults is not None:
                faults.after_file(path, step)

        return FileHooks(before, after)

    # ---- rollback and exports --------------------------------------------------------------

    def rollback_target(self, *, world_size: int, zero_stage: int, rollbacks: list[dict]):
        """``(checkpoint, None)`` to roll back to, or ``(None, why not)``."""
        good = self.last_good
        if good is None:
            return None, "no checkpoint to roll back to"
        again = sum(r["to_step"] == good.step for r in rollbacks)
        if again >= MAX_ROLLBACKS:
            return None, f"{again} rollbacks to it already"
        if good.world_size != world_size or good.zero_stage != zero_stage:
            return None, "it was written at another world size or ZeRO stage; resume it instead"
        return good, None

    def write_backbone(self, state: dict[str, torch.Tensor], name: str = "backbone.pt") -> None:
        """Rank 0: ``OUTPUT/name``, the fp32 backbone state dict (atomic)."""
        if self.rank != 0:
            return
        try:
            atomic_save(state, self.output / name)
        except OSError as exc:
            if self.cfg.save_failure == "error":
                raise CheckpointError(f"{self.output / name}: {exc}", path=self.output) from exc
            log.warning("%s not written (%s; train.save_failure: warn)", name, exc)


def run_meta(cfg: Config, engine, *, zero_stage: int, precision: str, num_classes: int,
             global_batch: int) -> dict[str, Any]:  # fmt: skip
    """What ``meta.json`` says of the run: what a resume checks and eval/export rebuild."""
    m = cfg.model
    return {
        "zero_stage": zero_stage,
        "precision": precision,
        "num_classes": num_classes,
        "embedding_size": m.embedding_size,
        "backbone": m.backbone,
        "backbone_options": m.options,
        "image_size": cfg.data.image_size,
        "global_batch": global_batch,
        "trained_params": [n for n, p in engine.module.named_parameters() if p.requires_grad],
    }


def schedule_state(schedule: PolynomialLRWarmup) -> dict[str, Any]:
    s = schedule
    return {"warmup_steps": s.warmup_steps, "total_steps": s.total_steps, "power": s.power}


def warn_changed_run(
    ref: CheckpointRef,
    saved_schedule: dict[str, Any] | None,
    schedule: PolynomialLRWarmup,
    *,
    lr: float,
    global_batch: int,
    world_size: int,
) -> None:
    """A resume that silently changes the LR curve or the global batch is a different run."""
    before = ref.meta.get("global_batch", global_batch)
    if before != global_batch:
        log.warning(
            "resume changes the global batch %d -> %d (world size %d -> %d); the LR is not "
            "rescaled",
            before, global_batch, ref.world_size, world_size,
        )  # fmt: skip
    now = schedule_state(schedule)
    if saved_schedule is not None and saved_schedule != now:
        step = ref.step
        old = PolynomialLRWarmup(**saved_schedule).factor(step) * lr
        log.warning(
            "resume changes the LR schedule %s -> %s (train.max_steps, train.epochs, "
            "optim.warmup_epochs or the steps per epoch changed): the LR of step %d jumps "
            "from %.4g to %.4g",
            saved_schedule, now, step + 1, old, schedule.factor(step) * lr,
        )  # fmt: skip
