"""Rank-0 progress line, ``metrics.jsonl``, TensorBoard scalars and (optionally) W&B.

One JSON object per logged optimizer step, with at least ``step``, ``loss``, ``lr``,
``img_per_s`` and ``loss_scale``; the ``time_*`` keys split the wall time since the previous
logged step into data, backbone (forward + backward), head (forward + backward) and optimizer
(gradient reduction at a stage-0 boundary, ``engine.step`` and ``SparseSGD.step``) seconds per step.

TensorBoard (``train.tensorboard``, on by default; ``tensorboard`` is in requirements.txt):
event files in ``OUTPUT/tensorboard/``, ``tensorboard --logdir OUTPUT/tensorboard``. Each
training row's numbers go under ``train/`` (``train/loss``, ``train/lr``, ``train/img_per_s``,
``train/loss_scale`` when there is one, i.e. fp16, ``train/time_*``, ``train/epoch``); the
evaluation rows' under their own names (``eval/<set>/accuracy`` ...), all at the optimizer step.
W&B (``train.wandb: true``, the ``wandb`` package): the same numbers under the same names, one
run per ``fit``, the config as the run's config, files in ``OUTPUT/wandb/``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("pfc_ds.train")

PHASES = ("data", "backbone", "head", "optimizer")


# Which progress-line phase each span of ``pfc_ds.phases`` belongs to (the head's sub-spans,
# ``head/...``, count as head; ``step``'s own time is the loop's overhead, shown nowhere).
_COARSE = {
    "data": "data",
    "backbone_fwd": "backbone",
    "backward": "backbone",
    "head_fwd": "head",
    "head_bwd": "head",
    "comm": "optimizer",
    "backbone_opt": "optimizer",
    "head_opt": "optimizer",
}


def coarse_phases(split_ms: dict[str, float]) -> dict[str, float]:
    """Seconds per progress-line phase from a ``PhaseClock.collect()`` split (ms)."""
    out = dict.fromkeys(PHASES, 0.0)
    for name, ms in split_ms.items():
        phase = "head" if name.startswith("head/") else _COARSE.get(name)
        if phase is not None:
            out[phase] += ms / 1e3
    return out


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsLogger:
    """Writes only on rank 0; other ranks keep the in-memory history used by tests."""

    def __init__(
        self,
        output: str | os.PathLike,
        *,
        rank: int,
        total_steps: int,
        tensorboard: bool = False,
        stream=None,
        wandb: bool = False,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.rank = rank
        self.total_steps = total_steps
        self.path = Path(output) / "metrics.jsonl"
        self.stream = stream or sys.stdout
        self.writer = None
        self.wandb_run = None
        if rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self.writer = _tensorboard_writer(Path(output) / "tensorboard")
            if wandb:
                self.wandb_run = _wandb_run(Path(output), run_config or {})
        self._t0 = time.perf_counter()
        self._t_last = self._t0
        self._steps_since_start = 0

    def start(self, step: int) -> None:
        """Mark the first step of this run (a resumed run starts counting for ETA here)."""
        self._first_step = step
        self._t0 = self._t_last = time.perf_counter()

    def log(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        images: int,
        steps: int,
        loss_scale: float | None,
        phases: dict[str, float],
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``step``: optimizer steps done; ``images``/``steps``: global images and steps since
        the last call (for img/s and the per-step time split)."""
        now = time.perf_counter()
        dt = max(now - self._t_last, 1e-9)
        self._t_last = now
        record: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "img_per_s": images / dt,
            "loss_scale": loss_scale,
        }
        for phase, seconds in phases.items():
            record[f"time_{phase}"] = seconds / max(steps, 1)
        if extra:
            record.update(extra)
        if self.rank != 0:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._scalars(record, "train/")
        done = step - getattr(self, "_first_step", 0)
        rate = (now - self._t0) / max(done, 1)
        eta = _format_eta(rate * (self.total_steps - step))
        scale = "-" if loss_scale is None else f"{loss_scale:g}"
        split = " ".join(f"{p[:4]} {1e3 * record[f'time_{p}']:.0f}" for p in PHASES)
        print(
            f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.5f} "
            f"img/s {record['img_per_s']:.1f} scale {scale} eta {eta} | ms/step {split}",
            file=self.stream,
            flush=True,
        )
        return record

    def write(self, record: dict[str, Any], tensorboard_prefix: str = "") -> None:
        """Append a record (rank 0) to ``metrics.jsonl``; its numbers also go to TensorBoard."""
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._scalars(record, tensorboard_prefix)

    def _scalars(self, record: dict[str, Any], prefix: str) -> None:
        """The record's numbers (``None`` and text left out) to TensorBoard and W&B."""
        step = int(record.get("step", 0))
        values = {
            f"{prefix}{key}": float(value)
            for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb_run is not None and values:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # tensorboard is optional
        log.warning("train.tensorboard is on but TensorBoard is not installed (%s); skipping", exc)
        return None
    # Flushed every 30 s (not 120): a run killed between flushes loses less of its curve.
    return SummaryWriter(str(path), flush_secs=30)


def _wandb_run(output: Path, config: dict[str, Any]):
    """A W&B run for this fit (``WANDB_PROJECT``, default ``pfc_ds``; ``WANDB_MODE=offline``
    writes locally); ``None`` with a warning when wandb is not installed (train.sh's pre-check
    refuses that before any rank starts)."""
    try:
        import wandb
    except ImportError as exc:
        log.warning("train.wandb is on but wandb is not installed (%s); skipping", exc)
        return None
    output.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "pfc_ds"),
        name=output.name,
        dir=str(output),
        config=config,
    )


def memory_extra(device) -> dict[str, float]:
    """The peak device memory so far, on a GPU (a ``metrics.jsonl`` field)."""
    import torch

    if device.type == "cuda":
        return {"max_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
    return {}


def startup_text(
    cfg, world_size: int, total_steps: int, engine_summary: str, num_classes: int
) -> str:
    """The run in one line, logged once at start-up."""
    t = cfg.train
    return (
        f"{cfg.model.backbone}, {world_size} rank(s) x batch {t.batch_size} x accum "
        f"{t.grad_accum} = {world_size * t.batch_size * t.grad_accum} img/step, {total_steps} "
        f"steps, {engine_summary}, head {num_classes} classes x {cfg.model.embedding_size} "
        f"(r={cfg.head.sample_rate:g})"
    )
