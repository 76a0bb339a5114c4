"""``Trainer``: wires config -> data -> backbone engine -> head, and runs the step loop.

The loop counts optimizer steps. A SIGTERM or SIGINT (preemption) is all-reduced at every step boundary, so
every rank stops after the same step, saves a checkpoint and returns; ``train.py`` then exits 143.

Faults (README "Reliability"):

* **Divergence.** Under fp32/bf16 a non-finite loss is found at the next logging interval or save
  (a step itself makes no host sync); under fp16 it is an overflow (both optimizers skip, the
  scale backs off) until ``train.max_consecutive_skips`` skips in a row or an overflow at the
  minimum scale. Then ``train.on_divergence``: ``stop`` raises ``DivergenceError`` naming the
  step, the scale history and the last good checkpoint; ``rollback`` reloads that checkpoint,
  multiplies the LR by ``train.rollback_lr_factor`` and continues (logged in ``metrics.jsonl``).
  Weights are checked on the device before every save: a non-finite one is never written.
* **A dead or hung peer.** Every process group times out after ``train.collective_timeout_s``;
  the failure is re-raised as ``PeerFailure`` naming the step and the missing rank, and a
  watchdog covers hangs no collective sees.
* **Resume.** ``--resume`` or ``train.auto_resume`` takes the newest checkpoint whose files all
  verify against ``meta.json``; a damaged one is named, set aside, and the previous one used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pfc_ds import phases
from pfc_ds.head import seeds
from pfc_ds.train import backends, peers, preflight, resume
from pfc_ds.train import checkpoint as ckpt
from pfc_ds.train.checkpoint import CheckpointError
from pfc_ds.train.config import Config, ConfigError, pipeline_config
from pfc_ds.train.distributed import init_distributed
from pfc_ds.train.divergence import DivergenceError, ScaleGuard, nonfinite_weights
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
from pfc_ds.train.faults import Faults
from pfc_ds.train.metrics import MetricsLogger, coarse_phases
from pfc_ds.train.schedule import PolynomialLRWarmup
from pfc_ds.train.stop import StopRequest

log = logging.getLogger("pfc_ds.train")

MAX_ROLLBACKS = 3  # rollbacks in a row to one checkpoint before the run stops anyway


def _user_errors() -> tuple[type[Exception], ...]:
    from data_pipelines.recordio import RecordError
    from data_pipelines.sources import DataError

    return (ConfigError, DataError, RecordError, FileNotFoundError, CheckpointError)


# A bad key, value or file, identical on every rank: ``train.py`` prints it once, no traceback.
USER_ERRORS = _user_errors()

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Rollback(Exception):
    """Raised inside the loop to reload the last good checkpoint (``train.on_divergence``)."""


def build_loader(cfg: Config, *, rank: int, world_size: int, device, seed: int):
    """The data iterator: the built-in synthetic source or ``data_pipelines`` (DALI)."""
    d = cfg.data
    if d.source == "synthetic":
        from pfc_ds.train.synthetic import SyntheticFaces

        return SyntheticFaces(
            num_classes=d.num_classes,
            num_images=d.num_images,
            image_size=d.image_size,
            batch_size=cfg.train.batch_size,
            rank=rank,
            world_size=world_size,
            seed=d.seed,
            device=device,
        )
    import data_pipelines  # imported lazily: DALI is only needed for real data

    pipe_cfg = pipeline_config(d)
    loader = data_pipelines.build_loader(
        pipe_cfg,
        batch_size=cfg.train.batch_size,
        rank=rank,
        world_size=world_size,
        device=device,
        seed=seed,
    )
    if d.num_classes is None:  # the head takes the data set's declared class count
        d.num_classes = loader.num_classes
        if rank == 0:
            log.info(
                "data.num_classes = %d (declared by %s)", d.num_classes, d.pipeline.get("path")
            )
    return loader


def load_pretrained(model: torch.nn.Module, path: str) -> None:
    """Backbone weights from a ``.pt`` state dict or a pfc_ds checkpoint folder."""
    p = Path(path)
    if p.is_dir():
        found = ckpt.find_latest(p) if (p / ckpt.CHECKPOINTS).is_dir() else None
        if found is None:
            meta = json.loads((p / ckpt.META).read_text())
            found = (p, meta)
        state = ckpt.consolidated_backbone(*found)
    else:
        state = torch.load(p, map_location="cpu", weights_only=False)
        for key in ("state_dict", "module", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)


class Trainer:
    """``Trainer(cfg).fit()`` trains; tests may inject a ``backbone`` or a ``loader``."""

    def __init__(
        self,
        cfg: Config,
        *,
        ds_config: str | os.PathLike | dict | None = None,
        output: str | os.PathLike | None = None,
        resume: bool = False,
        backbone: torch.nn.Module | None = None,
        loader=None,
        stream=None,
    ) -> None:
        self.cfg = cfg
        self.ds_source = ds_config if ds_config is not None else cfg.train.deepspeed
        self.output = Path(output or cfg.train.output)
        # train.auto_resume: a restarted (torchrun --max-restarts) or resubmitted job continues.
        self.resume = resume or cfg.train.auto_resume
        self._backbone = backbone
        self._loader = loader
        self.stream = stream
        self.history: list[dict[str, Any]] = []
        self._unread: list[int] = []  # history entries whose loss is still a device tensor
        self.stopped_by_signal = False
        self.last_good: Path | None = None  # the newest checkpoint saved or resumed from
        self.loaded_tag: str | None = None  # the tag resumed from (never pruned by this run)
        self.rollbacks: list[dict[str, Any]] = []
        self._lr_factor = 1.0  # product of the rollbacks' LR factors (checkpointed)
        self._where = "before the first step"  # what runs now, for a peer failure's message
        self._watchdog: peers.Watchdog | None = None
        self._stop: StopRequest | None = None  # while fit() runs

    # ---- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        backends.configure(tf32=cfg.train.tf32, deterministic=cfg.train.deterministic)
        self.rank, self.world_size = init_distributed(cfg.train.collective_timeout_s)
        # Host-side agreement (SIGTERM, file lists, checks) goes over gloo, so it never waits for
        # the GPU's queued work.
        gloo = dist.get_backend() == "gloo"
        self._control_group = (
            None
            if gloo
            else dist.new_group(
                backend="gloo", timeout=timedelta(seconds=cfg.train.collective_timeout_s)
            )
        )
        self.faults = Faults.from_env(self.rank)
        self._agree(preflight.unwritable(self.output), ConfigError)
        found = (
            resume.pick_checkpoint(self.output, self.rank, self._control_group)
            if self.resume
            else None
        )
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart and not self.resume and self.rank == 0:
            log.warning(
                "torchrun restart %d without --resume or train.auto_resume: training starts over "
                "from step 0",
                restart,
            )
        if found is not None:
            self._agree(preflight.resume_mismatch(found[1], found[0], cfg), ConfigError)
        ds = build_ds_config(self.ds_source, cfg, self.world_size)
        fp16 = ds.get("fp16", {})
        dynamic = fp16.get("enabled") and not fp16.get("loss_scale", 0)
        self.guard = ScaleGuard(
            cfg.train.max_consecutive_skips, fp16.get("min_loss_scale", 1) if dynamic else None
        )
        stage = ds.get("zero_optimization", {}).get("stage", 0)

        torch.manual_seed(cfg.train.seed)  # identical backbone init on every rank
        model = self._backbone
        if model is None:
            from pfc_ds.backbones import get_backbone

            model = get_backbone(
                cfg.model.backbone,
                cfg.model.embedding_size,
                dropout=cfg.model.dropout,
                gradient_checkpointing=cfg.model.gradient_checkpointing,
                **cfg.model.options,
            )
        restore = "none"
        if found is not None:
            restore = resume.plan_restore(
                found, stage, ds, model, world_size=self.world_size, optimizer=cfg.optim.name
            )
        elif cfg.model.pretrained:
            load_pretrained(model, cfg.model.pretrained)
            log.info("fine-tuning from %s with a fresh head", cfg.model.pretrained)

        self.engine = initialize(model, build_optimizer(cfg, model), ds)
        self.precision = precision(self.engine)
        self.zero_stage = stage
        self.loader = self._loader or build_loader(
            cfg,
            rank=self.rank,
            world_size=self.world_size,
            device=self.engine.device,
            seed=cfg.data.seed,
        )
        if found is not None:  # data.num_classes is known now (the loader may supply it)
            self._agree(preflight.resume_mismatch(found[1], found[0], cfg), ConfigError)
        self._build_head()  # after the loader: it may supply data.num_classes
        from pfc_ds.train.evaluation import Evaluator

        self.evaluator = Evaluator(cfg, self.output, self.rank)
        self.eval_history: list[dict[str, Any]] = []
        gas = cfg.train.grad_accum
        micro_per_epoch = len(self.loader)
        self.total_steps = (
            cfg.train.max_steps
            if cfg.train.max_steps is not None
            else max(1, int(cfg.train.epochs * micro_per_epoch) // gas)
        )
        warmup = min(self.total_steps, round(cfg.optim.warmup_epochs * micro_per_epoch / gas))
        self.schedule = PolynomialLRWarmup(warmup, self.total_steps, cfg.optim.power)
        # Host timers for the progress line's split; ``pfc_ds.profile`` swaps in CUDA events.
        self.clock = phases.PhaseClock()
        self.on_split: Callable[[int, dict[str, float]], None] | None = None  # per step, ms
        self._split_sum: dict[str, float] = {}
        self.step, self.epoch = 0, 0
        torch.manual_seed(seeds.backbone(cfg.train.seed, self.rank))  # dropout differs per rank
        # Python's and numpy's global RNGs too: they are checkpointed, so an unseeded start made
        # two launches of one run write different trainer states (and checksums).
        ckpt.seed_host_rngs(seeds.backbone(cfg.train.seed, self.rank))
        if found is not None:
            self._restore(found, restore)
            self.loaded_tag, self.last_good = found[0].name, found[0]
        self.lockstep = self._make_lockstep()
        self._estimate_checkpoint(found)
        self._space_checked = False
        if self.rank == 0:
            log.info(
                "pfc_ds: %s, %d rank(s) x batch %d x accum %d = %d img/step, %d steps, %s, "
                "head %d classes x %d (r=%g)",
                cfg.model.backbone,
                self.world_size,
                cfg.train.batch_size,
                gas,
                self.global_batch,
                self.total_steps,
                ds_config_summary(ds),
                cfg.data.num_classes,
                cfg.model.embedding_size,
                cfg.head.sample_rate,
            )

    def _make_lockstep(self) -> Lockstep:
        """A fresh lockstep (no deferred flags) at the base LRs times ``_lr_factor``."""
        lrs = (self.cfg.optim.lr, self.cfg.head_optimizer()[1]["lr"])
        return Lockstep(
            self.engine,
            self.head,
            self.head_optimizer,
            self.schedule,
            (lrs[0] * self._lr_factor, lrs[1] * self._lr_factor),
            prefetch=self.cfg.head.bank_prefetch,
            head_inf=self.faults.head_inf if self.faults else None,
        )

    def _agree(self, problem: str | None, error: type[Exception]) -> None:
        """Raise ``error`` on every rank if any rank found ``problem`` (the lowest rank's)."""
        problems = ckpt.gather_objects(problem, self._control_group)
        first = next((p for p in problems if p is not None), None)
        if first is not None:
            raise error(first)

    def _estimate_checkpoint(self, found) -> None:
        """The bytes of one checkpoint (estimated, or the resumed one's size, the larger)."""
        cfg = self.cfg
        mine = preflight.checkpoint_bytes(
            self.engine, self.head, cfg.optim.name, cfg.optim.momentum, rank=self.rank
        )
        need = self.checkpoint_estimate = sum(ckpt.gather_objects(mine, self._control_group))
        if found is not None:
            need = max(need, int(found[1].get("bytes") or 0))
        self.checkpoint_bytes = need

    def _check_space_for_one_checkpoint(self) -> None:
        """Before the first step of a run that saves: room for one checkpoint (a run that
        never saves, as the profiler's, needs none)."""
        cfg, need = self.cfg, self.checkpoint_bytes
        root = self.output / ckpt.CHECKPOINTS
        short = ckpt.space_short(root, need, self._control_group)
        if short is None:
            return
        message = (
            f"train.output: {ckpt.size_text(short[1])} free on {root} (rank {short[0]}), one "
            f"checkpoint needs about {ckpt.size_text(need)}"
        )
        if cfg.train.save_failure == "error":
            raise CheckpointError(message + " (train.save_failure: warn trains on without saving)")
        if self.rank == 0:
            log.warning("%s; training anyway (train.save_failure: warn)", message)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.world_size

    def _build_head(self) -> None:
        import pfc_ds

        h, cfg = self.cfg.head, self.cfg
        gemm = h.gemm_dtype
        if gemm == "auto":
            gemm = self.precision
        margin = pfc_ds.CombinedMarginLoss(
            h.scale, *h.margin, interclass_filtering_threshold=h.interclass_filtering_threshold
        )
        self.head = pfc_ds.PartialFC(
            margin,
            embedding_size=cfg.model.embedding_size,
            num_classes=cfg.data.num_classes,
            sample_rate=h.sample_rate,
            dtype=_TORCH_DTYPES[h.dtype],
            seed=cfg.train.seed,
            momentum_dtype=_TORCH_DTYPES.get(h.momentum_dtype) if h.momentum_dtype else None,
            device=self.engine.device,
            gemm_dtype=None if gemm == "fp32" else _TORCH_DTYPES[gemm],
            even_batches=True,  # the loaders give every rank the same batch size
            chunk=h.chunk,
            bank=h.bank,
            bank_path=h.bank_path,
        )
        name, kwargs = cfg.head_optimizer()
        optimizer = pfc_ds.SparseAdamW if name == "adamw" else pfc_ds.SparseSGD
        self.head_optimizer = optimizer(self.head, **kwargs)

    def _meta(self) -> dict[str, Any]:
        return {
            "zero_stage": self.zero_stage,
            "precision": self.precision,
            "num_classes": self.cfg.data.num_classes,
            "embedding_size": self.cfg.model.embedding_size,
            "backbone": self.cfg.model.backbone,
            "backbone_options": self.cfg.model.options,
            "image_size": self.cfg.data.image_size,
            "global_batch": self.global_batch,
            "trained_params": [
                n for n, p in self.engine.module.named_parameters() if p.requires_grad
            ],
        }

    # ---- resume --------------------------------------------------------------------------

    def _restore(self, found, how: str) -> None:
        folder, meta = found
        if how == "engine":
            path, _ = self.engine.load_checkpoint(
                str(folder.parent), tag=folder.name, load_lr_scheduler_states=False
            )
            if path is None:
                raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}")
        elif how == "universal":
            uni = folder.parent / "universal"
            path, _ = self.engine.load_checkpoint(
                str(uni), tag=folder.name, load_lr_scheduler_states=False
            )
            if path is None:
                raise FileNotFoundError(f"DeepSpeed found no universal checkpoint in {uni}")
        step = int(meta["step"])
        ckpt.load_head(
            self.head, folder, meta, seed=seeds.resharded_base(self.cfg.train.seed, step)
        )
        state = ckpt.load_trainer_state(folder, meta)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self._lr_factor = float(state.get("lr_factor", 1.0))
        self.loader.load_state_dict(state["data"])
        if "rng" in state:
            ckpt.set_rng_state(state["rng"])
        else:
            torch.manual_seed(seeds.backbone(self.cfg.train.seed, self.rank, self.step))
        if self.rank == 0:
            log.info("resumed from %s at step %d (%s restore)", folder, self.step, how)
            resume.warn_changed_run(
                meta,
                state.get("schedule"),
                self.schedule,
                step=self.step,
                lr=self.cfg.optim.lr,
                global_batch=self.global_batch,
                world_size=self.world_size,
                batch_size=self.cfg.train.batch_size,
                grad_accum=self.cfg.train.grad_accum,
            )

    # ---- loop ----------------------------------------------------------------------------

    def fit(
        self,
        stop_at: int | None = None,
        *,
        save: bool = True,
        on_step: Callable[[int], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Train to the schedule's end, or stop after step ``stop_at``; returns the history.

        ``stop_at`` (``--max-steps``) only stops early: the LR schedule always spans
        ``total_steps`` (``train.max_steps`` or ``train.epochs``), so a run stopped at 20 and
        resumed to 30 follows the same LR curve as one run straight to 30. Writes a checkpoint
        at the last step and ``OUTPUT/backbone.pt`` unless stopped by a signal or ``save`` is
        off (the profiler's runs). ``on_step(step)`` runs after every optimizer step.
        """
        if not hasattr(self, "engine"):
            with self._peer_failures():
                self.setup()
        if save and not self._space_checked:
            self._check_space_for_one_checkpoint()
            self._space_checked = True
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        logger = MetricsLogger(
            self.output,
            rank=self.rank,
            total_steps=self.total_steps,
            tensorboard=self.cfg.train.tensorboard,
            stream=self.stream,
        )
        logger.start(self.step)
        self._logger = logger
        self._since_log = 0
        previous_clock = phases.install(self.clock)
        self.clock.collect()
        self._split_sum = {}
        timeout = self.cfg.train.collective_timeout_s
        try:
            with self._peer_failures():
                with (
                    StopRequest(self._control_group) as self._stop,
                    peers.Watchdog(timeout, wait_s=_report_wait_s(timeout)) as self._watchdog,
                ):
                    while True:
                        try:
                            if self._run(end, save, on_step):
                                return self.history  # stopped by a signal
                            break
                        except _Rollback as exc:
                            self._rollback(str(exc))
                if save:
                    self._where = "exporting backbone.pt"
                    self.export()
        finally:
            self._watchdog = self._stop = None
            phases.install(previous_clock)
            logger.close()
        return self.history

    @contextlib.contextmanager
    def _peer_failures(self) -> Iterator[None]:
        """Re-raise a collective that failed for a dead or hung peer as ``PeerFailure``."""
        try:
            yield
        except Exception as exc:
            if isinstance(exc, peers.PeerFailure) or not peers.is_peer_failure(exc):
                raise
            timeout = self.cfg.train.collective_timeout_s
            raise peers.describe(self._where, str(exc), timeout, _report_wait_s(timeout)) from exc

    def _run(self, end: int, save: bool, on_step: Callable[[int], None] | None) -> bool:
        """Steps to ``end`` with logs, evaluations and checkpoints; True: stopped by a signal."""
        logger, stop = self._logger, self._stop
        for res, loss in self._optimizer_steps(end):
            # Timed too (billed to the next step), so the phases cover the whole loop.
            with phases.span("loop"):
                self._record(res, loss)
                self._log(logger, res, end)
                if on_step is not None:
                    on_step(self.step)
            if self.evaluator.due(self.step, end):
                self._where = f"evaluating after step {self.step}"
                with phases.span("eval"), self._watchdog.paused():
                    self._evaluate(logger)
            self._where = f"agreeing on a stop after step {self.step}"
            with phases.span("comm"):
                agreed = stop.agreed()
            if agreed:
                saved = self.save()
                self.stopped_by_signal = True
                if stop.signal_name is not None or self.rank == 0:
                    why = stop.signal_name or "a signal to another rank"
                    what = "saved" if saved is not None else "could not save"
                    log.warning("%s: %s step %d, stopping", why, what, self.step)
                return True
            every = self.cfg.train.save_every
            if save and (self.step == end or (every and self.step % every == 0)):
                with phases.span("checkpoint"):
                    self.save()
        self._flush()
        return False

    def _micro_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` epoch after epoch; the loader owns the epoch count."""
        while True:
            # Iterating an exhausted loader (resumed at an epoch's last step) starts the next.
            batches = iter(self.loader)
            self.epoch = getattr(self.loader, "epoch", self.epoch)
            while True:
                try:
                    with phases.span("data"):
                        batch = next(batches)
                except StopIteration:
                    break
                yield batch
            self.loader.reset()
            self.epoch = getattr(self.loader, "epoch", self.epoch + 1)

    def _optimizer_steps(self, end: int) -> Iterator[tuple[StepResult, torch.Tensor]]:
        """Run optimizer steps of ``grad_accum`` micro-batches each; yield each step's result
        and its mean loss (device)."""
        batches = self._micro_batches()
        gas = self.cfg.train.grad_accum
        while self.step < end:
            phases.begin("step")  # its own time: the loop's overhead between phases
            self._where = f"in step {self.step + 1}"
            if self._watchdog is not None:
                self._watchdog.beat(self._where)
            if self.faults:
                self.faults.before_step(self.step + 1)
            window = [next(batches) for _ in range(gas)]
            if self.faults:
                window = [(self.faults.poison(im, self.step + 1), lab) for im, lab in window]
            res = self.lockstep.step(window, self.step)
            self.step += 1
            phases.end("step")
            self._add_split(self.clock.collect())
            yield res, res.loss

    def _add_split(self, split: dict[str, float]) -> None:
        """One optimizer step's phases (ms): summed for the progress line, handed to
        ``on_split`` (the profiler) as they are."""
        for name, ms in split.items():
            self._split_sum[name] = self._split_sum.get(name, 0.0) + ms
        if self.on_split is not None:
            self.on_split(self.step, split)

    def _record(self, res: StepResult, loss: torch.Tensor) -> None:
        """History entries hold the loss on the device until ``_flush`` reads them in one go."""
        self._unread.append(len(self.history))
        self.history.append(
            {
                "step": self.step,
                "loss": loss,
                "lr": res.lr,
                "loss_scale": res.loss_scale,
                "applied": res.applied,
            }
        )
        # Host values only (DeepSpeed's overflow flag and scale): no sync of our own.
        reason = self.guard.record(self.step, res.applied, res.loss_scale)
        if reason is not None:
            self._diverged(reason)

    def _diverged(self, reason: str) -> None:
        """Training diverged at this step: roll back (``train.on_divergence``) or stop."""
        good = self.last_good
        message = (
            f"training diverged: {reason}; {self.guard.history_text()}; last good checkpoint: "
            f"{good if good is not None else 'none'}"
        )
        if self.cfg.train.on_divergence == "rollback":
            again = sum(r["to_step"] == self._tag_step(good) for r in self.rollbacks)
            if good is None:
                why = "no checkpoint to roll back to"
            elif again >= MAX_ROLLBACKS:
                why = f"{again} rollbacks to it already"
            elif not self._same_run(good):
                why = "it was written at another world size or ZeRO stage; resume it instead"
            else:
                raise _Rollback(message)
            raise DivergenceError(f"{message} ({why}; stopping)")
        raise DivergenceError(
            f"{message} (resume it with --resume at a lower optim.lr, or set "
            "train.on_divergence: rollback)"
        )

    def _same_run(self, folder: Path) -> bool:
        """Whether ``folder`` reloads in place (same world size and ZeRO stage)."""
        meta = json.loads((folder / ckpt.META).read_text())
        return meta["world_size"] == self.world_size and meta["zero_stage"] == self.zero_stage

    @staticmethod
    def _tag_step(folder: Path | None) -> int | None:
        m = ckpt.TAG_RE.fullmatch(folder.name) if folder is not None else None
        return int(m.group(1)) if m else None

    def _rollback(self, reason: str) -> None:
        """Reload the last good checkpoint at ``rollback_lr_factor`` x the LR; log it."""
        folder = self.last_good
        failed = self.step
        self._where = f"rolling back to {folder.name}"
        meta = json.loads((folder / ckpt.META).read_text())
        factor = self._lr_factor * self.cfg.train.rollback_lr_factor
        self.head_optimizer.zero_grad()  # rows of an unfinished window
        with self._watchdog.paused() if self._watchdog else contextlib.nullcontext():
            self._restore((folder, meta), "engine")
        self._lr_factor = factor
        self.lockstep = self._make_lockstep()
        self.guard.reset()
        self.history = [h for h in self.history if h["step"] <= self.step]
        self._unread = [i for i in self._unread if i < len(self.history)]
        event = {
            "step": failed,
            "event": "rollback",
            "to_step": self.step,
            "lr_factor": factor,
            "reason": reason,
        }
        self.rollbacks.append(event)
        self._logger.write(event)
        self._logger.start(self.step)
        if self.rank == 0:
            log.warning(
                "%s; rolled back to %s (step %d) with the LR x %g",
                reason,
                folder,
                self.step,
                factor,
            )

    def _flush(self) -> None:
        """The one host sync of a logging interval: raise for deferred faults, read the losses."""
        try:
            self.lockstep.check()
        except FloatingPointError as exc:  # fp32/bf16: a non-finite loss, no scale to back off
            self._diverged(str(exc))
        if self._unread:
            losses = torch.stack([self.history[i]["loss"] for i in self._unread]).tolist()
            for i, value in zip(self._unread, losses, strict=True):
                self.history[i]["loss"] = value
            self._unread.clear()

    def _log(self, logger: MetricsLogger, res: StepResult, end: int) -> None:
        self._since_log += 1
        if self.step % self.cfg.train.log_every and self.step != end:
            return
        self._flush()
        split, self._split_sum = self._split_sum, {}
        logger.log(
            self.step,
            loss=self.history[-1]["loss"],
            lr=res.lr,
            images=self._since_log * self.global_batch,
            steps=self._since_log,
            loss_scale=loss_scale(self.engine),
            phases=coarse_phases(split),
            extra=self._log_extra(res),
        )
        self._since_log = 0

    def _evaluate(self, logger: MetricsLogger) -> None:
        """Score the verification sets on every rank; rank 0 logs; optionally keep the best."""
        from pfc_ds.train.evaluation import format_results

        results = self.evaluator.run(self.engine)
        metrics, improved = self.evaluator.record(self.step, results)
        self.eval_history.append(metrics)
        logger.write(metrics, tensorboard_prefix="")
        if self.rank == 0:
            print(format_results(self.step, results), file=logger.stream, flush=True)
        if improved and self.cfg.eval.save_best:
            state = full_backbone_state(self.engine)  # collective under ZeRO
            if self.rank == 0:
                from pfc_ds.train.shard_files import atomic_save

                atomic_save(state, self.output / "best_backbone.pt")

    def _log_extra(self, res) -> dict[str, Any]:
        extra: dict[str, Any] = {"epoch": self.epoch, "skipped": not res.applied}
        if self.engine.device.type == "cuda":
            extra["max_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return extra

    def save(self) -> Path | None:
        """Checkpoint this step (collective); ``None`` if it could not be written and
        ``train.save_failure`` is ``warn``. Never writes non-finite weights."""
        self._flush()  # never save after a fault the flags still hold
        if self._nonfinite_weights():
            self._diverged(f"step {self.step}: non-finite weights found before the checkpoint")
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "data": self.loader.state_dict(),
            "schedule": resume.schedule_state(self.schedule),
            "lr_factor": self._lr_factor,
        }
        self._where = f"in the checkpoint of step {self.step}"
        stop = self._stop
        try:
            with stop.saving(self.step) if stop is not None else contextlib.nullcontext():
                folder = ckpt.save(
                    self.engine,
                    self.head,
                    state,
                    self.output,
                    self.step,
                    self._meta(),
                    keep_last=self.cfg.train.keep_last,
                    need_bytes=int(self.checkpoint_bytes * 1.05),
                    protect=(self.loaded_tag,) if self.loaded_tag else (),
                    group=self._control_group,
                    hooks=self._file_hooks(),
                )
        except CheckpointError as exc:
            if self.cfg.train.save_failure == "error":
                raise CheckpointError(
                    f"{exc}; the previous checkpoint {self.last_good} is intact "
                    "(train.save_failure: warn trains on)"
                ) from exc
            if self.rank == 0:
                log.warning("%s; training on (train.save_failure: warn)", exc)
            return None
        self.last_good = folder
        size = json.loads((folder / ckpt.META).read_text()).get("bytes")
        self.checkpoint_bytes = int(size or self.checkpoint_bytes)
        return folder

    def _file_hooks(self) -> ckpt.FileHooks:
        step, dog, faults = self.step, self._watchdog, self.faults

        def before(path: Path) -> None:
            if faults:
                faults.before_file(path)

        def after(path: Path) -> None:
            if dog is not None:
                dog.beat(f"in the checkpoint of step {step}")
            if faults:
                faults.after_file(path, step)

        return ckpt.FileHooks(before, after)

    def _nonfinite_weights(self) -> bool:
        """Any NaN/inf in the backbone or the head's rows, on any rank (one sync per save).
        The head's bank keeps a flag of the values written to it, so its rows (maybe a disk
        bank's every page) are not read."""
        tensors = []
        for p in self.engine.module.parameters():
            part = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition
            tensors.append(p if part is None else part)
        head_ok = self.head.bank.all_finite()
        return nonfinite_weights(tensors, self.engine.device, finite_flags=[head_ok])

    def export(self) -> None:
        """Write ``OUTPUT/backbone.pt``: the trained fp32 backbone state dict (rank 0)."""
        state = full_backbone_state(self.engine)
        if self.rank == 0:
            from pfc_ds.train.shard_files import atomic_save

            try:
                atomic_save(state, self.output / "backbone.pt")
            except OSError as exc:
                if self.cfg.train.save_failure == "error":
                    raise CheckpointError(f"{self.output / 'backbone.pt'}: {exc}") from exc
                log.warning("%s not written (%s; train.save_failure: warn)", "backbone.pt", exc)

    def head_state(self) -> dict[str, Any]:
        return self.head.state_dict()

    def backbone_state(self) -> dict[str, torch.Tensor]:
        return full_backbone_state(self.engine)


def _report_wait_s(timeout_s: float) -> float:
    """How long a survivor waits for the other survivors to report before naming the rest."""
    return min(5.0, max(1.0, timeout_s / 4))
