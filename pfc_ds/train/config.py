"""The training config: typed dataclasses loaded from YAML, with ``--set a.b=v`` overrides.

Every error names the offending key (``optim.name``) and what is allowed there, so a typo in a
100-line YAML file is a one-line fix. The DeepSpeed JSON stays separate and holds only what
DeepSpeed owns (precision, ZeRO stage, clipping); batch sizes come from here and are written
into it by ``engine.build_ds_config``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pfc_ds.head.names import BANKS
from pfc_ds.head.names import DTYPES as _HEAD_DTYPES

DATA_SOURCES = ("synthetic", "rec", "folder")
OPTIMIZERS = ("sgd", "adamw")
DTYPES = tuple(_HEAD_DTYPES)
SAVE_FAILURES = ("error", "warn")
ON_DIVERGENCE = ("stop", "rollback")
MAX_CONSECUTIVE_SKIPS = 50
GEMM_DTYPES = ("auto", "fp32", "fp16", "bf16")
MARGIN_NAMES = ("adaface",)  # head.margin by name; a list is CombinedMarginLoss's [m1, m2, m3]


class ConfigError(ValueError):
    """A bad key or value in the training config; the message names the key."""


@dataclass
class ModelConfig:
    backbone: str = "r50"  # any name registered in pfc_ds.backbones
    embedding_size: int = 512
    dropout: float = 0.0
    gradient_checkpointing: bool = False
    pretrained: str | None = None  # backbone weights to fine-tune from; the head starts fresh
    options: dict = field(default_factory=dict)  # extra get_backbone() keywords


@dataclass
class HeadConfig:
    # [m1, m2, m3] of CombinedMarginLoss (the default is ArcFace; [1, 0, 0.4] CosFace), or
    # adaface: AdaFace with adaface_m, adaface_h and adaface_t_alpha (head.md)
    margin: list | str = field(default_factory=lambda: [1.0, 0.5, 0.0])
    scale: float = 64.0
    adaface_m: float = 0.4  # AdaFace's margin m
    adaface_h: float = 0.333  # how far a feature norm moves AdaFace's margin (0: CosFace)
    adaface_t_alpha: float = 0.01  # momentum of AdaFace's running norm statistics
    sample_rate: float = 1.0
    interclass_filtering_threshold: float = 0.0
    dtype: str = "fp32"  # storage dtype of the class centres
    momentum_dtype: str | None = None  # None: the storage dtype
    gemm_dtype: str = "auto"  # auto: the engine's precision
    chunk: int | None = None  # sampled columns per softmax block; None: a 64 MB block
    # Where the centres and their optimizer states live: device (the GPU, or the CPU), host
    # (host RAM, rows copied per step) or disk (memory-mapped files in bank_path).
    bank: str = "device"
    bank_path: str | None = None  # disk: a folder for the bank's files (scratch space)
    # Sample the window's rows and start their gather before the first backbone forward (a
    # host or disk bank's rows then travel while the backbone computes); false: after it.
    bank_prefetch: bool = True
    # The head's row-sparse optimizer: sgd (SparseSGD) or adamw (SparseAdamW); None: optim.name,
    # as insightface trains the head with the backbone's optimizer.
    optimizer: str | None = None
    # Its hyper-parameters; None takes optim.* (required for an sgd head under an adamw backbone).
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None


@dataclass
class DataSection:
    """The ``data:`` section: the source, and the built-in synthetic source's keys. For ``rec``
    and ``folder`` every other key goes to ``data_pipelines.config.DataConfig`` (``pipeline``,
    checked there: ``pipeline_config``)."""

    source: str = "synthetic"
    # The head's class count. rec/folder: defaults to the data set's declared count (property,
    # header or folder count); synthetic: required.
    num_classes: int | None = None
    num_images: int = 100_000  # one epoch; synthetic: how many global sample indices
    image_size: int = 112
    seed: int = 0
    # rec/folder: every other key under `data:` goes to data_pipelines.config.DataSection.
    pipeline: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1  # base LR at the end of warmup
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 0.0
    power: float = 1.0  # polynomial decay exponent (insightface: 1)


@dataclass
class TrainConfig:
    batch_size: int = 128  # per rank, per micro-step
    grad_accum: int = 1
    epochs: float = 20.0
    max_steps: int | None = None  # optimizer steps; overrides the epoch count for the run length
    seed: int = 2048
    output: str = "runs/default"
    deepspeed: str | None = None  # default DeepSpeed JSON; --deepspeed_config overrides it
    log_every: int = 50
    save_every: int = 0  # optimizer steps between checkpoints; 0: at the end only
    keep_last: int = 2  # checkpoints to keep; 0 keeps all
    tensorboard: bool = True  # OUTPUT/tensorboard/ event files (rank 0)
    # Also log to Weights & Biases (rank 0; needs the wandb package; WANDB_PROJECT, WANDB_MODE
    # and the other WANDB_* variables apply; the project defaults to pfc_ds).
    wandb: bool = False
    # fp16: this many optimizer steps skipped in a row (overflow) is divergence; default 50.
    max_consecutive_skips: int | None = None
    max_skipped_steps: int | None = None  # its former name, still read
    # Seconds a collective waits for a dead or hung peer before every survivor exits naming the
    # step and the rank (the process groups' timeout).
    collective_timeout_s: float = 600.0
    # Seconds a gloo group (the default one on CPU, the side group next to NCCL) may take to
    # connect once every rank has arrived; a rank that cannot reach another fails every node
    # within it (at most collective_timeout_s). See docs/multinode.md.
    connect_timeout_s: float = 30.0
    # Resume from the newest verified checkpoint in the output folder without --resume (a job
    # restarted by torchrun --max-restarts, or resubmitted, continues by itself).
    auto_resume: bool = False
    # Start over in an output folder that holds a run's checkpoints (--overwrite): its files are
    # moved to OUTPUT/replaced/<time>/ first. Without it (or --resume, or auto_resume) such a
    # folder is refused, so two runs never mix in one folder.
    overwrite: bool = False
    save_failure: str = "error"  # a checkpoint that cannot be written: error (stop) or warn
    on_divergence: str = "stop"  # stop, or rollback to the last good checkpoint at a lower LR
    rollback_lr_factor: float = 0.5  # LR multiplier applied at each rollback
    # GPU: fp32 matmuls and convolutions on TF32 tensor cores (10 mantissa bits in products).
    tf32: bool = True
    # Deterministic algorithms and no cuDNN autotuning: bit-for-bit repeatable GPU runs.
    deterministic: bool = False


@dataclass
class EvalConfig:
    """Verification sets scored while training (insightface's lfw/cfp_fp/agedb_30 ``.bin``)."""

    sets: list = field(default_factory=list)  # .bin paths, read (and checked) at startup
    every: int = 0  # optimizer steps between evaluations; 0: only at the end
    batch_size: int = 64  # images per forward (each rank embeds its slice of a set)
    # > 0: also write and score OUTPUT/eval/synthetic.bin, held-out pairs of the synthetic
    # source (its classes from data.num_classes on, never trained on).
    synthetic_pairs: int = 0
    save_best: bool = False  # write OUTPUT/best_backbone.pt when the mean accuracy improves


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        cfg = _build(cls, d or {}, "")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def head_optimizer(self) -> tuple[str, dict[str, Any]]:
        """The head's optimizer name (``sgd`` or ``adamw``) and its keyword arguments."""
        h, o = self.head, self.optim
        name = h.optimizer or o.name
        pick = lambda mine, theirs: theirs if mine is None else mine  # noqa: E731
        if name == "adamw":
            if h.momentum is not None:
                raise ConfigError(
                    "head.momentum applies to an sgd head; the head trains with adamw "
                    "(head.optimizer or optim.name): drop it, or set head.optimizer: sgd"
                )
            return name, {
                "lr": pick(h.lr, o.lr),
                "betas": tuple(o.betas),
                "weight_decay": pick(h.weight_decay, o.weight_decay),
            }
        if o.name != "sgd" and None in (h.lr, h.momentum, h.weight_decay):
            raise ConfigError(
                "head.lr, head.momentum and head.weight_decay must be set for an sgd head when "
                f"optim.name is {o.name!r} (its LR and decay do not carry over)"
            )
        return name, {
            "lr": pick(h.lr, o.lr),
            "momentum": pick(h.momentum, o.momentum),
            "weight_decay": pick(h.weight_decay, o.weight_decay),
        }

    def validate(self) -> None:
        _choice("data.source", self.data.source, DATA_SOURCES)
        _choice("optim.name", self.optim.name, OPTIMIZERS)
        _choice("head.dtype", self.head.dtype, DTYPES)
        _choice("head.momentum_dtype", self.head.momentum_dtype, (None, *DTYPES))
        _choice("head.gemm_dtype", self.head.gemm_dtype, GEMM_DTYPES)
        _choice("head.optimizer", self.head.optimizer, (None, *OPTIMIZERS))
        _choice("head.bank", self.head.bank, BANKS)
        if self.head.bank == "disk" and not self.head.bank_path:
            raise ConfigError("head.bank: disk needs head.bank_path (a folder for its files)")
        self._validate_margin()
        if not 0.0 <= self.head.sample_rate <= 1.0:  # 0: positives only, as in the head
            raise ConfigError(f"head.sample_rate must be in [0, 1], got {self.head.sample_rate}")
        if self.data.num_classes is None and self.data.source == "synthetic":
            raise ConfigError("data.num_classes is required with data.source: synthetic")
        for key, value in (
            ("model.embedding_size", self.model.embedding_size),
            ("data.num_classes", self.data.num_classes or 1),
            ("data.num_images", self.data.num_images),
            ("data.image_size", self.data.image_size),
            ("train.batch_size", self.train.batch_size),
            ("train.grad_accum", self.train.grad_accum),
            ("train.log_every", self.train.log_every),
            ("head.chunk", self.head.chunk or 1),
            ("eval.batch_size", self.eval.batch_size),
        ):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if self.train.max_steps is not None and self.train.max_steps < 0:
            raise ConfigError(f"train.max_steps must be >= 0, got {self.train.max_steps}")
        if self.optim.lr < 0 or self.optim.weight_decay < 0 or self.optim.warmup_epochs < 0:
            raise ConfigError("optim.lr, optim.weight_decay and optim.warmup_epochs must be >= 0")
        if self.data.source == "synthetic" and self.data.pipeline:
            raise ConfigError(
                f"data.{next(iter(self.data.pipeline))} is not a key of the synthetic source; "
                f"allowed: {', '.join(_field_names(DataSection, skip=('pipeline',)))}"
            )
        if self.eval.every < 0 or self.eval.synthetic_pairs < 0:
            raise ConfigError("eval.every and eval.synthetic_pairs must be >= 0")
        if self.eval.synthetic_pairs and self.data.source != "synthetic":
            raise ConfigError("eval.synthetic_pairs needs data.source: synthetic")
        for path in self.eval.sets:
            if not Path(str(path)).is_file():
                raise ConfigError(f"eval.sets: {path} is not a file")
        self._validate_train()
        self.head_optimizer()

    def _validate_margin(self) -> None:
        h = self.head
        named = isinstance(h.margin, str)
        if (h.margin not in MARGIN_NAMES) if named else len(h.margin) != 3:
            raise ConfigError(f"head.margin must be [m1, m2, m3] or adaface, got {h.margin!r}")
        if named and h.interclass_filtering_threshold > 0:
            raise ConfigError(
                "head.interclass_filtering_threshold applies to [m1, m2, m3] margins; "
                "head.margin: adaface filters no negatives"
            )
        for key, value, ok, want in (
            ("head.adaface_m", h.adaface_m, lambda v: 0 <= v < math.pi / 2, "in [0, pi/2)"),
            ("head.adaface_h", h.adaface_h, lambda v: v >= 0, ">= 0"),
            ("head.adaface_t_alpha", h.adaface_t_alpha, lambda v: 0 <= v <= 1, "in [0, 1]"),
        ):
            if not ok(value):
                raise ConfigError(f"{key} must be {want}, got {value}")

    def _validate_train(self) -> None:
        t, o = self.train, self.optim
        _choice("train.save_failure", t.save_failure, SAVE_FAILURES)
        _choice("train.on_divergence", t.on_divergence, ON_DIVERGENCE)
        if t.overwrite and t.auto_resume:
            raise ConfigError(
                "train.overwrite and train.auto_resume exclude each other: auto_resume continues "
                "the run in train.output, overwrite starts it over (every restart would)"
            )
        old, new = t.max_skipped_steps, t.max_consecutive_skips
        if old is not None and new is not None and old != new:
            raise ConfigError(
                f"train.max_skipped_steps={old} and train.max_consecutive_skips={new} disagree; "
                "max_skipped_steps is the former name: keep max_consecutive_skips only"
            )
        t.max_consecutive_skips = next(
            (v for v in (new, old) if v is not None), MAX_CONSECUTIVE_SKIPS
        )
        t.max_skipped_steps = None
        for key, value, ok, want in (
            ("train.max_consecutive_skips", t.max_consecutive_skips, lambda v: v >= 1, ">= 1"),
            ("train.collective_timeout_s", t.collective_timeout_s, lambda v: v > 0, "> 0"),
            ("train.connect_timeout_s", t.connect_timeout_s, lambda v: v > 0, "> 0"),
            ("train.rollback_lr_factor", t.rollback_lr_factor, lambda v: 0 < v <= 1, "in (0, 1]"),
            ("train.save_every", t.save_every, lambda v: v >= 0, ">= 0"),
            ("train.keep_last", t.keep_last, lambda v: v >= 0, ">= 0"),
            ("train.epochs", t.epochs, lambda v: v > 0 or t.max_steps is not None, "> 0"),
            ("optim.momentum", o.momentum, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("model.dropout", self.model.dropout, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("head.scale", self.head.scale, lambda v: v > 0, "> 0"),
        ):
            if not ok(value):
                raise ConfigError(f"{key} must be {want}, got {value}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas must be two values in [0, 1), got {o.betas!r}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (YAML) and apply ``key=value`` overrides (values parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return Config.from_dict(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``a.b=v`` sets ``raw['a']['b'] = yaml(v)``; the key is checked when the config is built."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value)


# ---- building dataclasses from dicts -----------------------------------------------------------


def _field_names(cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in skip]


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join("null" if a is None else str(a) for a in allowed)
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {shown}")


def _build(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {d!r}")
    names = _field_names(cls)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if key not in names or (cls is DataSection and key == "pipeline"):
            if cls is DataSection:
                extra[key] = value  # rec/folder pipeline options, checked by data_pipelines
                continue
            raise ConfigError(f"unknown key {path!r}; allowed: {', '.join(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path + ".")
        else:
            kwargs[key] = _coerce(path, value, hint)
    if extra:
        kwargs["pipeline"] = extra
    return cls(**kwargs)


def _coerce(path: str, value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    optional = type(None) in args and (
        typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType)
    )
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path} must not be null")
    members = [a for a in args if a is not type(None)]
    if len(members) > 1:  # list | str: the first type the value is
        for member in members:
            try:
                return _coerce(path, value, member)
            except ConfigError:
                pass
        want = " or ".join(m.__name__ for m in members)
        raise ConfigError(f"{path} must be {want}, got {value!r}")
    base = next(a for a in args if a is not type(None)) if optional else hint
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
    elif base is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif base is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - a field type this loader does not know
        raise TypeError(f"{path}: unsupported field type {hint}")
    want = base.__name__ + (" or null" if optional else "")
    raise ConfigError(f"{path} must be {want}, got {value!r}")


def pipeline_config(d: DataSection):
    """``data_pipelines``' config for a rec/folder ``data:`` section (its keys checked there;
    an unknown or bad one raises ``ConfigError`` naming it). Imports no DALI."""
    from data_pipelines.config import DataConfig as PipelineConfig

    given = {} if d.num_classes is None else {"num_classes": d.num_classes}
    try:
        return PipelineConfig.from_dict(
            {"source": d.source, "image_size": d.image_size, **given, **d.pipeline}
        )
    except ValueError as exc:  # data_pipelines names the key; make it a config error
        raise ConfigError(str(exc)) from exc
