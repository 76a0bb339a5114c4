"""``Trainer``: config -> data -> backbone engine -> head, and the step loop over them.

``Trainer(cfg)`` builds everything: the process groups, the data, the engine, the head, and
the components that own their policies (``Checkpointer``: resume, saves, rollback targets;
``Evaluator``: when and what to score; ``ScaleGuard`` and ``divergence.decide``: when training
diverged and what then; ``StepLog``: history and logging). ``fit()`` runs optimizer steps. A
SIGTERM or SIGINT is agreed at every step boundary, so every rank stops after the same step,
saves it and returns (``train.py`` exits 143). What each fault does is in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pfc_ds import phases
from pfc_ds.checkpoint import RestoreMode, consolidated_backbone
from pfc_ds.checkpoint.comm import gather_objects
from pfc_ds.checkpoint.rng import seed_host_rngs
from pfc_ds.head import seeds
from pfc_ds.train import backends, peers, preflight
from pfc_ds.train.build import (
    build_backbone,
    build_head,
    build_loader,
    build_schedule,
    load_pretrained,
)
from pfc_ds.train.checkpointer import Checkpointer, run_meta, schedule_state, warn_changed_run
from pfc_ds.train.config import Config, ConfigError
from pfc_ds.train.distributed import compute_device, control_group, env_rank, init_distributed
from pfc_ds.train.divergence import Rollback, ScaleGuard, decide, nonfinite_model
from pfc_ds.train.engine import (
    Lockstep,
    StepResult,
    build_ds_config,
    build_optimizer,
    ds_config_summary,
    full_backbone_state,
    initialize,
    loss_scale,
    precision,
)
from pfc_ds.train.evaluation import Evaluator
from pfc_ds.train.faults import Faults
from pfc_ds.train.history import StepLog
from pfc_ds.train.metrics import MetricsLogger, memory_extra, startup_text
from pfc_ds.train.stop import StopRequest

log = logging.getLogger("pfc_ds.train")


class Trainer:
    """``Trainer(cfg).fit()`` trains. The profiler passes a ``clock`` (CUDA events) and
    ``on_split(step, ms by phase)``; the reliability tests ``faults`` (default: from
    ``PFC_DS_FAULT``, none in a real run: then no hook costs more than a ``None`` test)."""

    def __init__(
        self,
        cfg: Config,
        *,
        ds_config: str | os.PathLike | dict | None = None,
        output: str | os.PathLike | None = None,
        resume: bool = False,
        stream=None,
        clock: phases.PhaseClock | None = None,
        on_split: Callable[[int, dict[str, float]], None] | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.cfg = cfg
        self.output = Path(output or cfg.train.output)
        self.stream = stream
        self.clock = clock or phases.PhaseClock()  # host timers for the progress line's split
        self.history: list[dict[str, Any]] = []
        self.rollbacks: list[dict[str, Any]] = []
        self.stopped_by_signal = False
        self.step = 0
        self._lr_factor = 1.0  # product of the rollbacks' LR factors (checkpointed)
        self._where = "before the first step"  # what runs now, for a peer failure's message
        self._watchdog: peers.Watchdog | None = None
        self._stop: StopRequest | None = None  # while fit() runs
        self._connect(faults)
        with peers.translated(lambda: self._where, self.cfg.train.collective_timeout_s):
            ds = build_ds_config(ds_config or cfg.train.deepspeed, cfg, self.world_size)
            ref = self._prepare(ds, resume or cfg.train.auto_resume)
            self._build(ds, ref)
        self.log = StepLog(self.history, log_every=cfg.train.log_every,
                           global_batch=self.global_batch, on_split=on_split)  # fmt: skip
        if self.rank == 0:
            log.info("pfc_ds: %s", startup_text(cfg, self.world_size, self.total_steps,
                                                 ds_config_summary(ds), self.num_classes))  # fmt: skip

    # ---- construction ----------------------------------------------------------------------

    def _connect(self, faults: Faults | None) -> None:
        """Process groups, GPU switches, fault injection, the checkpointer."""
        t = self.cfg.train
        backends.configure(tf32=t.tf32, deterministic=t.deterministic)
        # The launcher's RANK: the gloo_loopback fault acts before the groups exist.
        self.faults = faults if faults is not None else Faults.from_env(env_rank()) or None
        self.rank, self.world_size = init_distributed(
            t.collective_timeout_s, connect_timeout_s=t.connect_timeout_s, faults=self.faults
        )
        self._control_group = control_group(t.collective_timeout_s, t.connect_timeout_s)
        self.checkpointer = Checkpointer(self.output, t, rank=self.rank,
                                         group=self._control_group, faults=self.faults)  # fmt: skip

    def _prepare(self, ds: dict, resume: bool):
        """The output, the data and the checkpoint to resume (checked against the config)."""
        cfg = self.cfg
        self._agree(preflight.unwritable(self.output), ConfigError)
        ref = self.checkpointer.find(resume)
        self.guard = ScaleGuard.for_engine(ds, cfg.train.max_consecutive_skips)
        self.zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
        self.loader, self.num_classes = build_loader(
            cfg, rank=self.rank, world_size=self.world_size, device=compute_device()
        )
        if ref is not None:
            self._agree(preflight.resume_mismatch(ref, cfg, self.num_classes), ConfigError)
        return ref

    def _build(self, ds: dict, ref) -> None:
        """Backbone engine, head, evaluator, schedule, restored state and the lockstep."""
        cfg = self.cfg
        model = build_backbone(cfg)  # from train.seed: identical on every rank
        plan = None
        if ref is not None:
            plan = self.checkpointer.plan(ref, stage=self.zero_stage, world_size=self.world_size,
                                          optimizer=cfg.optim.name)  # fmt: skip
            ds = plan.ds_config(ds)
            if plan.mode is RestoreMode.WEIGHTS:
                model.load_state_dict(consolidated_backbone(ref), strict=True)
        elif cfg.model.pretrained:
            load_pretrained(model, cfg.model.pretrained)
            log.info("fine-tuning from %s with a fresh head", cfg.model.pretrained)
        self.engine = initialize(model, build_optimizer(cfg, model), ds)
        self.precision = precision(self.engine)
        self.head, self.head_optimizer = build_head(
            cfg, num_classes=self.num_classes, device=self.engine.device, precision=self.precision
        )
        self.evaluator = Evaluator(cfg, self.output, self.rank)
        self.schedule = build_schedule(cfg, len(self.loader))
        self.total_steps = self.schedule.total_steps
        torch.manual_seed(seeds.backbone(cfg.train.seed, self.rank))  # dropout differs per rank
        # Python's and numpy's RNGs too: they are checkpointed, so an unseeded start made two
        # launches of one run write different trainer states (and checksums).
        seed_host_rngs(seeds.backbone(cfg.train.seed, self.rank))
        if plan is not None:
            self._resume(plan)
        self.lockstep = self._make_lockstep()
        self.checkpointer.estimate(self.engine, self.head, cfg.optim.name, cfg.optim.momentum)

    def _make_lockstep(self) -> Lockstep:
        """A fresh lockstep (no deferred flags) at the base LRs times ``_lr_factor``."""
        lrs = (self.cfg.optim.lr * self._lr_factor,
               self.cfg.head_optimizer()[1]["lr"] * self._lr_factor)  # fmt: skip
        head_inf = self.faults.head_inf if self.faults is not None else None
        return Lockstep(self.engine, self.head, self.head_optimizer, self.schedule, lrs,
                        prefetch=self.cfg.head.bank_prefetch, head_inf=head_inf)  # fmt: skip

    def _agree(self, problem: str | None, error: type[Exception]) -> None:
        """Raise ``error`` on every rank if any rank found ``problem`` (the lowest rank's)."""
        first = next((p for p in gather_objects(problem, self._control_group) if p), None)
        if first is not None:
            raise error(first)

    @property
    def eval_history(self) -> list[dict[str, Any]]:
        return self.evaluator.history

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.world_size

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs of the trainer itself (the engine and head save their own)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "data": self.loader.state_dict(),
            "schedule": schedule_state(self.schedule),
            "lr_factor": self._lr_factor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self._lr_factor = float(state.get("lr_factor", 1.0))
        self.loader.load_state_dict(state["data"])

    def _resume(self, plan) -> None:
        state = self.checkpointer.restore(plan, self.engine, self.head, seed=self.cfg.train.seed)
        self.load_state_dict(state)
        if self.rank == 0:
            warn_changed_run(plan.ref, state.get("schedule"), self.schedule, lr=self.cfg.optim.lr,
                             global_batch=self.global_batch, world_size=self.world_size)  # fmt: skip

    # ---- the loop ----------------------------------------------------------------------------

    def fit(
        self,
        stop_at: int | None = None,
        *,
        save: bool = True,
        on_step: Callable[[int], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Train to the schedule's end, or stop after step ``stop_at``; returns the history.

        ``stop_at`` (``--max-steps``) only stops early: the LR schedule always spans
        ``total_steps``, so a run stopped at 20 and resumed to 30 follows the same LR curve as
        one run straight to 30. Writes a checkpoint at the last step and ``OUTPUT/backbone.pt``
        unless stopped by a signal or ``save`` is off (the profiler's runs). ``on_step(step)``
        runs after every optimizer step.
        """
        if save:
            self.checkpointer.check_space()
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        t = self.cfg.train
        logger = MetricsLogger(self.output, rank=self.rank, total_steps=self.total_steps,
                               tensorboard=t.tensorboard, stream=self.stream,
                               wandb=t.wandb, run_config=self.cfg.to_dict())  # fmt: skip
        logger.start(self.step)
        self.log.restart()
        previous_clock = phases.install(self.clock)
        self.clock.collect()
        timeout = self.cfg.train.collective_timeout_s
        try:
            with (
                peers.translated(lambda: self._where, self.cfg.train.collective_timeout_s),
                StopRequest(self._control_group) as self._stop,
                peers.Watchdog(timeout, wait_s=peers.report_wait_s(timeout)) as self._watchdog,
            ):
                while True:
                    try:
                        if self._run(end, save, on_step, logger):
                            return self.history  # stopped by a signal
                        break
                    except Rollback as exc:
                        self._rollback(str(exc), logger)
                if save:
                    self._where = "exporting backbone.pt"
                    self.checkpointer.write_backbone(full_backbone_state(self.engine))
        finally:
            self._watchdog = self._stop = None
            phases.install(previous_clock)
            logger.close()
        return self.history

    def _run(self, end: int, save: bool, on_step, logger: MetricsLogger) -> bool:
        """Steps to ``end``: step -> history -> log -> eval -> stop agreement -> checkpoint.
        True: stopped by a signal."""
        for res, split in self._optimizer_steps(end):
            with phases.span("loop"):  # timed too (billed to the next step)
                self.log.record(self.step, res, split)
                # Host values only (DeepSpeed's overflow flag and scale): no sync of our own.
                if (why := self.guard.record(self.step, res.applied, res.loss_scale)) is not None:
                    self._diverged(why)
                if self.log.due(self.step, end):
                    self._flush()
                    extra = {"epoch": self.epoch, **memory_extra(self.engine.device)}
                    self.log.write(logger, self.step, loss_scale(self.engine), extra)
                if on_step is not None:
                    on_step(self.step)
            if self.evaluator.due(self.step, end):
                self._where = f"evaluating after step {self.step}"
                with phases.span("eval"), self._watchdog.paused():
                    self._evaluate(logger)
            self._where = f"agreeing on a stop after step {self.step}"
            with phases.span("comm"):
                agreed = self._stop.agreed()
            if agreed:  # every rank: save this step and return from fit
                saved = self.save()
                self.stopped_by_signal = True
                self._stop.announce(saved is not None, self.step, self.rank)
                return True
            if save and self.checkpointer.due(self.step, end):
                with phases.span("checkpoint"):
                    self.save()
        self._flush()
        return False

    def _optimizer_steps(self, end: int) -> Iterator[tuple[StepResult, dict[str, float]]]:
        """Optimizer steps of ``grad_accum`` micro-batches each, to ``end``, with their phase
        split (ms)."""
        batches = self._micro_batches()
        gas, faults = self.cfg.train.grad_accum, self.faults
        while self.step < end:
            phases.begin("step")  # its own time: the loop's overhead between phases
            self._where = f"in step {self.step + 1}"
            self._watchdog.beat(self._where)
            if faults is not None:
                faults.before_step(self.step + 1)
            window = [next(batches) for _ in range(gas)]
            if faults is not None:
                window = [(faults.poison(im, self.step + 1), lab) for im, lab in window]
            res = self.lockstep.step(window, self.step)
            self.step += 1
            phases.end("step")
            yield res, self.clock.collect()

    def _micro_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` epoch after epoch; the loader owns the epoch count."""
        while True:
            # Iterating an exhausted loader (resumed at an epoch's last step) starts the next.
            batches = iter(self.loader)
            while True:
                try:
                    with phases.span("data"):
                        batch = next(batches)
                except StopIteration:
                    break
                yield batch
            self.loader.reset()

    def _flush(self) -> None:
        """The one host sync of a logging interval: raise for deferred faults, read the losses."""
        try:
            self.lockstep.check()
        except FloatingPointError as exc:  # fp32/bf16: a non-finite loss, no scale to back off
            self._diverged(str(exc))
        self.log.read()

    def _evaluate(self, logger: MetricsLogger) -> None:
        """Score the verification sets on every rank; optionally keep the best backbone."""
        if self.evaluator.evaluate(self.engine, self.step, logger) and self.cfg.eval.save_best:
            state = full_backbone_state(self.engine)  # collective under ZeRO
            self.checkpointer.write_backbone(state, "best_backbone.pt")

    # ---- divergence ------------------------------------------------------------------------

    def _diverged(self, reason: str) -> None:
        """Training diverged at this step: roll back (``train.on_divergence``) or stop."""
        good = self.checkpointer.last_good
        message = (
            f"training diverged: {reason}; {self.guard.history_text()}; last good checkpoint: "
            f"{good.folder if good is not None else 'none'}"
        )
        target, why = self.checkpointer.rollback_target(
            world_size=self.world_size, zero_stage=self.zero_stage, rollbacks=self.rollbacks
        )
        decide(message, self.cfg.train.on_divergence, target, why)

    def _rollback(self, reason: str, logger: MetricsLogger) -> None:
        """Reload the last good checkpoint at ``rollback_lr_factor`` x the LR; log it."""
        ref = self.checkpointer.last_good
        failed = self.step
        self._where = f"rolling back to {ref.tag}"
        factor = self._lr_factor * self.cfg.train.rollback_lr_factor
        self.head_optimizer.zero_grad()  # rows of an unfinished window
        with self._watchdog.paused():
            plan = self.checkpointer.plan(ref, stage=self.zero_stage, world_size=self.world_size,
                                          optimizer=self.cfg.optim.name)  # fmt: skip
            self.load_state_dict(
                self.checkpointer.restore(plan, self.engine, self.head, seed=self.cfg.train.seed)
            )
        self._lr_factor = factor
        self.lockstep = self._make_lockstep()
        self.guard.reset()
        self.log.truncate(self.step)
        event = {"step": failed, "event": "rollback", "to_step": self.step, "lr_factor": factor,
                 "reason": reason}  # fmt: skip
        self.rollbacks.append(event)
        logger.write(event)
        logger.start(self.step)
        if self.rank == 0:
            log.warning("%s; rolled back to %s (step %d) with the LR x %g", reason, ref.folder,
                        self.step, factor)  # fmt: skip

    # ---- saving ------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """Checkpoint this step (collective); its folder, or ``None`` if it could not be written
        and ``train.save_failure`` is ``warn``. Never writes non-finite weights."""
        self._flush()  # never save after a fault the flags still hold
        if nonfinite_model(self.engine, self.head):
            self._diverged(f"step {self.step}: non-finite weights found before the checkpoint")
        self._where = f"in the checkpoint of step {self.step}"
        stop, dog = self._stop, self._watchdog
        with stop.saving(self.step) if stop is not None else contextlib.nullcontext():
            meta = run_meta(self.cfg, self.engine, zero_stage=self.zero_stage,
                            precision=self.precision, num_classes=self.num_classes,
                            global_batch=self.global_batch)  # fmt: skip
            ref = self.checkpointer.save(self.step, self.engine, self.head, self.state_dict(),
                                         meta, beat=dog.beat if dog else None)  # fmt: skip
        return None if ref is None else ref.folder

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The full fp32 backbone state dict (collective under ZeRO)."""
        return full_backbone_state(self.engine)
