"""The backbone's DeepSpeed engine and the head's lockstep with it.

The Partial FC head lives outside ZeRO (its rows are model-parallel, not data-parallel), so
everything DeepSpeed does to the backbone's gradients around an optimizer step must be mirrored
on the head by hand. ``Lockstep.step`` runs one accumulation window of micro-batches and one
optimizer step of both:

* **Loss scale.** The head's row gradients carry whatever factor the backward applied to the
  loss. A hook on the loss tensor keeps that factor ``f`` (= scale / gas, a device tensor) every
  micro-step, and the head steps with ``grad_scale = f * gas``, so it sees exactly the mean
  gradient the backbone sees at every ZeRO stage and precision. DeepSpeed 0.19.8 scales the loss
  inside ``engine.backward`` only for ZeRO optimizers; at stage 0 its fp16 optimizers neither
  scale the loss nor skip the unscale, so the backbone would move by 1/scale and never overflow.
  We therefore scale the loss by ``cur_scale`` ourselves at stage 0 under fp16.
* **Overflow.** A hook on the embeddings fires when the head's backward is done; it all-reduces
  (MAX) a device flag "this rank's pending row gradients or the loss are non-finite". Under fp16
  a set flag turns the embedding gradient to NaN on every rank (by arithmetic, not a branch), so
  DeepSpeed's own overflow check skips the backbone step and moves the loss scale exactly once;
  the head skips whenever the engine reports ``was_step_applied() == False``. Under fp32/bf16
  there is nothing to skip to: ``check()`` raises ``FloatingPointError`` naming the first bad
  step at the next logging interval, and before any checkpoint is written.
* **Accumulation.** ``step`` takes the window's K micro-batches at once: the head samples its
  rows for all their labels before the first forward, every backward adds into the window's one
  row gradient, and both optimizers step after the last; ``engine.backward`` already divides
  the loss by the accumulation steps once (insightface #2140).
* **LR.** Set from the schedule on both optimizers right before the boundary ``engine.step()``:
  once per optimizer step, never per micro-batch (insightface #1996).
* **Clipping** of the backbone is DeepSpeed's (``gradient_clipping`` in the JSON); the head is
  not clipped, as in insightface.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pfc_ds import phases
from pfc_ds.train.config import Config, ConfigError
from pfc_ds.train.schedule import PolynomialLRWarmup

log = logging.getLogger("pfc_ds.train")

# DeepSpeed defaults gradient_clipping to 1.0 when the key is absent; make users say it.
_CLIP_DEFAULT = 1.0


def load_ds_config(source: str | os.PathLike | dict | None) -> dict[str, Any]:
    if source is None:
        raise ConfigError(
            "no DeepSpeed config: pass --deepspeed_config FILE or set train.deepspeed in the YAML"
        )
    if isinstance(source, dict):
        return json.loads(json.dumps(source))
    with open(source) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON ({exc})") from exc


def build_ds_config(source, cfg: Config, world_size: int | None) -> dict[str, Any]:
    """The DeepSpeed JSON with the YAML's batch sizes written in; checks what would clash.

    ``world_size=None`` (the pre-launch check) leaves ``train_batch_size`` out.
    """
    ds = load_ds_config(source)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"DeepSpeed config has a {key!r} section; the optimizer and LR schedule come from "
                "the YAML (optim.*) so backbone and head follow one schedule; remove it"
            )
    want = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
    }
    if world_size is not None:
        want["train_batch_size"] = cfg.train.batch_size * cfg.train.grad_accum * world_size
    for key, value in want.items():
        if key in ds and ds[key] != value:
            raise ConfigError(
                f"DeepSpeed config sets {key}={ds[key]} but the YAML gives {value} "
                "(train.batch_size, train.grad_accum, world size); drop it from the JSON"
            )
        ds[key] = value
    if "gradient_clipping" not in ds:
        log.warning(
            "DeepSpeed config has no gradient_clipping; DeepSpeed then clips at %s",
            _CLIP_DEFAULT,
        )
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ConfigError("DeepSpeed config enables both fp16 and bf16; pick one")
    if ds.get("zero_optimization", {}).get("stage", 0) > 0:
        ds.setdefault("zero_allow_untested_optimizer", True)  # torch SGD/AdamW under ZeRO
    ds.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs; keep DeepSpeed quiet
    return ds


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """torch SGD/AdamW (no JIT-compiled DeepSpeed op needed), all parameters in one group."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def initialize(model: torch.nn.Module, optimizer, ds_config: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    return engine


def precision(engine) -> str:
    if engine.fp16_enabled():
        return "fp16"
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp32"


def loss_scale(engine) -> float | None:
    """The engine's current fp16 loss scale (``None`` without one)."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    cfg = getattr(opt, "loss_scale_config", None)
    if cfg is not None:
        return float(cfg.cur_scale)
    return float(opt.cur_scale)


def engine_scales_loss(engine) -> bool:
    """Whether ``engine.backward`` multiplies the loss by the loss scale (DeepSpeed 0.19.8)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    return isinstance(engine.optimizer, ZeROOptimizer) or (
        getattr(engine, "torch_autocast_z0_gradscaler", None) is not None
    )


def full_backbone_state(engine) -> dict[str, torch.Tensor]:
    """fp32 copy of the backbone's parameters (gathered under ZeRO) and buffers, on CPU."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    out: dict[str, torch.Tensor] = {}
    fp32_groups = None
    if engine.zero_optimization_stage() == 0 and precision(engine) != "fp32":
        # FP16_(Unfused)Optimizer keeps its fp32 masters in groups parallel to the params, under
        # bf16 too; the module's half copy would round small updates away.
        fp32_groups = {
            id(p): m
            for g16, g32 in zip(
                engine.optimizer.fp16_groups, engine.optimizer.fp32_groups, strict=True
            )
            for p, m in zip(g16, g32, strict=True)
        }
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None and fp32_groups is not None:
            full = fp32_groups.get(id(p))
        if full is None:
            full = p
        out[name] = full.detach().float().cpu().clone()
    for name, b in module.named_buffers():
        out[name] = b.detach().cpu().clone()
    return out


@dataclass
class StepResult:
    loss: torch.Tensor  # the step's global-batch loss (mean over micro-batches), on the device
    applied: bool = True  # whether the engine stepped (host, from DeepSpeed)
    lr: float | None = None
    loss_scale: float | None = None


class Lockstep:
    """Runs a window of micro-batches through backbone engine -> head -> loss -> backward,
    then both optimizer steps.

    A step reads nothing back from the device: the loss, the non-finite flag, the loss
    factors and the head's own step result stay device tensors, and ``check()`` (called by the
    trainer at its logging interval and before every save) reads them once and raises for what
    went wrong, naming the step. Under fp16 DeepSpeed's own overflow check is the one sync.
    """

    def __init__(
        self,
        engine,
        head,
        head_optimizer,
        schedule: PolynomialLRWarmup,
        base_lrs: tuple[float, float],
        *,
        prefetch: bool = True,
        head_inf: Callable[[int], bool] | None = None,
    ) -> None:
        self.engine = engine
        self.head = head
        self.head_optimizer = head_optimizer
        self.schedule = schedule
        self.base_lr, self.head_base_lr = base_lrs
        self.precision = precision(engine)
        self.gas = engine.gradient_accumulation_steps()
        self.manual_scale = self.precision == "fp16" and not engine_scales_loss(engine)
        self.input_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.precision, torch.float32
        )
        self._factors: list[torch.Tensor] = []  # d(backward's loss)/d(loss), per micro-batch
        self._poison: torch.Tensor | None = None  # this micro-batch's loss is non-finite
        self._window_bad: torch.Tensor | None = None  # flag (all-reduced) of this window
        self._head_bwd_open = False  # the head's backward phase runs between the two hooks
        self.prefetch = prefetch
        # Fault injection (reliability tests, the GPU check): ``head_inf(step)`` true makes the
        # head's row gradient of that step inf right after its backward. None in real runs.
        self._head_inf = head_inf
        self._inf_now = False
        # Read by check(): the first bad step (0: none) and its loss; factor and head mismatches.
        device = engine.device
        self._first_bad = torch.zeros((), dtype=torch.int64, device=device)
        self._bad_loss = torch.zeros((), device=device)
        self._factor_jump = torch.zeros((), dtype=torch.bool, device=device)
        self._head_disagrees = torch.zeros((), dtype=torch.int64, device=device)
        self._no_factor = torch.full((), 1.0 / self.gas, device=device)

    # ---- hooks ---------------------------------------------------------------------------

    def _loss_hook(self, grad: torch.Tensor) -> None:
        if self._head_bwd_open:
            phases.begin("head_bwd")
        self._factors.append(grad.detach().reshape(()))

    def _embedding_hook(self, grad: torch.Tensor) -> torch.Tensor | None:
        """Runs after the head's backward (its pending row grads are complete)."""
        phases.end("head_bwd")
        self._head_bwd_open = False
        if self._inf_now:
            self.head.window.grad[0].fill_(float("inf"))
            self._inf_now = False
        bad = self.head_optimizer.has_nonfinite()
        if self._poison is not None:
            bad = bad | self._poison
        flag = bad.to(grad.device, torch.float32).reshape(1)
        if dist.is_available() and dist.is_initialized():
            with phases.span("comm"):
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        flag = flag[0] > 0
        self._window_bad = flag if self._window_bad is None else self._window_bad | flag
        if self.precision == "fp16":  # NaN on every rank: DeepSpeed skips and backs off once
            return grad + torch.where(flag, float("nan"), 0.0).to(grad.dtype)
        return None

    # ---- one optimizer step ----------------------------------------------------------------

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> StepResult:
        """Forward and backward the window's micro-batches (``gradient_accumulation_steps``
        of them), then step both optimizers once.

        The head samples its rows once for the whole window, from all its labels (K micro-
        batches of B act as one batch of K x B); with ``prefetch`` and an offloaded bank that
        happens before the first backbone forward, so the rows travel while the backbone
        computes. A one-micro-batch step on a device bank opens no window beforehand: its
        labels ride with the embeddings' all-gather (three head collectives per step).
        ``step`` is the 0-based index of this optimizer step (for the LR); messages print it
        1-based, like the progress line.
        """
        if len(batches) != self.gas:
            raise ValueError(f"a step takes {self.gas} micro-batches, got {len(batches)}")
        device = self.engine.device
        self._inf_now = self._head_inf is not None and self._head_inf(step + 1)
        labels = [lab.to(device, torch.long, non_blocking=True) for _, lab in batches]
        if self.prefetch and self.head.offloaded:
            with phases.span("head_fwd"):
                self.head.prefetch(labels)
        losses = []
        for k, (images, _) in enumerate(batches):
            losses.append(self._micro_step(images, labels, k, step))
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        return self._optimizer_step(step, loss)

    def _micro_step(
        self, images: torch.Tensor, labels: list[torch.Tensor], k: int, step: int
    ) -> torch.Tensor:
        """Forward/backward micro-batch ``k`` of the window; returns its loss (device)."""
        engine = self.engine
        images = images.to(engine.device, self.input_dtype, non_blocking=True)
        with phases.span("backbone_fwd"):
            embeddings = engine(images)
        if k == 0 and self.head.window_needed(len(labels), self.prefetch):
            with phases.span("head_fwd"):
                self.head.prefetch(labels)
        if embeddings.requires_grad:
            embeddings.register_hook(self._embedding_hook)
        with phases.span("head_fwd"):
            loss = self.head(embeddings, labels[k])
        loss_value = loss.detach()
        self._poison = ~torch.isfinite(loss_value)
        loss.register_hook(self._loss_hook)
        scaled = loss * loss_scale(engine) if self.manual_scale else loss
        self._head_bwd_open = embeddings.requires_grad
        with phases.span("backward"):  # the backbone's, less the head's and DeepSpeed's comm
            engine.backward(scaled)
        if self._window_bad is not None and self.precision != "fp16":
            # No loss scale to back off: remember the first such step for check() to raise.
            first = (self._first_bad == 0) & self._window_bad
            self._first_bad = torch.where(first, step + 1, self._first_bad)
            self._bad_loss = torch.where(first, loss_value, self._bad_loss)
        if k + 1 < len(labels):
            with phases.span("backbone_opt"):
                engine.step()  # DeepSpeed counts micro-steps here; no update happens
        return loss_value

    def _optimizer_step(self, step: int, loss_value: torch.Tensor) -> StepResult:
        engine = self.engine
        factor = self.schedule.factor(step)
        for group in engine.optimizer.param_groups:
            group["lr"] = self.base_lr * factor
        self.head_optimizer.param_groups[0]["lr"] = self.head_base_lr * factor
        # The factor the loss was scaled by, per micro-batch; constant within a window.
        if self._factors:
            f = self._factors[-1]
            for x in self._factors[:-1]:
                self._factor_jump |= (x - f).abs() > 1e-6 * f.abs()
        else:  # built before any step: torch.full makes no host-to-device copy
            f = self._no_factor
        scale_before = loss_scale(engine)
        with phases.span("backbone_opt"):
            engine.step()
        applied = engine.was_step_applied()
        with phases.span("head_opt"):
            if applied:
                # grad_scale = f * gas: the rows hold sum_i f * dL_i/drows over gas batches.
                head_applied = self.head_optimizer.step(grad_scale=f * self.gas)
                self._head_disagrees = torch.where(
                    ~head_applied & (self._head_disagrees == 0), step + 1, self._head_disagrees
                )
            self.head_optimizer.zero_grad()  # after a skip: drop the window's rows
        self._factors.clear()
        self._window_bad = None
        return StepResult(
            loss=loss_value,
            applied=applied,
            lr=self.base_lr * factor,
            loss_scale=scale_before,
        )

    def check(self) -> None:
        """Read the deferred flags (one host sync) and raise for the first problem seen."""
        bad, loss, jump, head = torch.stack(
            [
                self._first_bad.double(),
                self._bad_loss.double(),
                self._factor_jump.double(),
                self._head_disagrees.double(),
            ]
        ).tolist()
        if bad:
            raise FloatingPointError(
                f"non-finite loss or head gradient at step {int(bad)} (loss {loss}) under "
                f"{self.precision}; there is no loss scale to back off. Lower optim.lr or check "
                "the data"
            )
        if jump:
            raise RuntimeError("the loss scale changed inside an accumulation window")
        if head:
            raise RuntimeError(
                f"step {int(head)}: the engine stepped but the head found non-finite gradients "
                "its overflow flag had not reported"
            )


def ds_config_summary(ds: dict) -> str:
    zero = ds.get("zero_optimization", {}).get("stage", 0)
    prec = (
        "fp16"
        if ds.get("fp16", {}).get("enabled")
        else ("bf16" if ds.get("bf16", {}).get("enabled") else "fp32")
    )
    off = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return f"ZeRO-{zero} {prec} offload={off} clip={ds.get('gradient_clipping', _CLIP_DEFAULT)}"
