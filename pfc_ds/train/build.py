"""Pure functions of the config that build the trainer's parts: backbone, data, head, schedule.

Each returns what it built and changes nothing it was given: the data set's class count comes
back beside the loader instead of being written into the config, so what a run was configured
with and what it found stay apart (the resume check compares both once).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

import pfc_ds
from pfc_ds.checkpoint import consolidated_backbone, open_checkpoint
from pfc_ds.head.names import dtype
from pfc_ds.train.config import Config, ConfigError, HeadConfig, pipeline_config
from pfc_ds.train.schedule import PolynomialLRWarmup

log = logging.getLogger("pfc_ds.train")


def build_backbone(cfg: Config) -> torch.nn.Module:
    """The backbone as configured, initialised from ``train.seed`` (the same on every rank)."""
    from pfc_ds.backbones import get_backbone

    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    return get_backbone(
        m.backbone,
        m.embedding_size,
        dropout=m.dropout,
        gradient_checkpointing=m.gradient_checkpointing,
        **m.options,
    )


def load_pretrained(model: torch.nn.Module, path: str) -> None:
    """``model.pretrained``: backbone weights from a ``.pt`` state dict (insightface's, or one
    wrapped as ``state_dict``/``module``/``model``) or a pfc_ds checkpoint (any folder
    ``open_checkpoint`` takes); loaded strictly."""
    p = Path(path)
    if p.is_dir():
        state = consolidated_backbone(open_checkpoint(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=False)
        for key in ("state_dict", "module", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def build_loader(cfg: Config, *, rank: int, world_size: int, device: torch.device):
    """``(loader, num_classes)``: the built-in synthetic source or ``data_pipelines`` (DALI or
    nvImageCodec), and the class count the head needs (``data.num_classes``, or the data set's
    own declared count when that is unset)."""
    d = cfg.data
    if d.source == "synthetic":
        from pfc_ds.train.synthetic import SyntheticFaces

        loader = SyntheticFaces(
            num_classes=d.num_classes,
            num_images=d.num_images,
            image_size=d.image_size,
            batch_size=cfg.train.batch_size,
            rank=rank,
            world_size=world_size,
            seed=d.seed,
            device=device,
        )
        return loader, d.num_classes
    import data_pipelines  # imported lazily: only real data needs DALI

    loader = data_pipelines.build_loader(
        pipeline_config(d),
        batch_size=cfg.train.batch_size,
        rank=rank,
        world_size=world_size,
        device=device,
        seed=d.seed,
    )
    if d.num_classes is None and rank == 0:
        log.info("data.num_classes = %d (declared by %s)", loader.num_classes, d.pipeline["path"])
    return loader, d.num_classes if d.num_classes is not None else loader.num_classes


def make_margin(h: HeadConfig) -> pfc_ds.CombinedMarginLoss | pfc_ds.AdaFace:
    """The margin of a ``head:`` section: ``adaface`` by name, else ``[m1, m2, m3]``."""
    if h.margin == "adaface":
        return pfc_ds.AdaFace(h.scale, h.adaface_m, h.adaface_h, h.adaface_t_alpha)
    return pfc_ds.CombinedMarginLoss(
        h.scale, *h.margin, interclass_filtering_threshold=h.interclass_filtering_threshold
    )


def make_head(
    h: HeadConfig,
    *,
    embedding_size: int,
    num_classes: int,
    seed: int,
    device: torch.device | str,
    precision: str = "fp32",
) -> pfc_ds.PartialFC:
    """The Partial FC head of a ``head:`` section (the one mapping from config to head; the
    scaling sweep builds its heads here too). ``precision`` resolves ``gemm_dtype: auto``."""
    gemm = precision if h.gemm_dtype == "auto" else h.gemm_dtype
    return pfc_ds.PartialFC(
        make_margin(h),
        embedding_size=embedding_size,
        num_classes=num_classes,
        sample_rate=h.sample_rate,
        dtype=dtype(h.dtype),
        seed=seed,
        momentum_dtype=dtype(h.momentum_dtype),
        device=device,
        gemm_dtype=None if gemm == "fp32" else dtype(gemm),
        even_batches=True,  # the loaders give every rank the same batch size
        chunk=h.chunk,
        bank=h.bank,
        bank_path=h.bank_path,
    )


def make_head_optimizer(head: pfc_ds.PartialFC, name: str, kwargs: dict[str, Any]):
    """``SparseSGD`` or ``SparseAdamW`` over ``head``."""
    if name not in ("sgd", "adamw"):
        raise ConfigError(f"head optimizer {name!r} is not one of sgd, adamw")
    return (pfc_ds.SparseAdamW if name == "adamw" else pfc_ds.SparseSGD)(head, **kwargs)


def build_head(cfg: Config, *, num_classes: int, device: torch.device, precision: str):
    """``(head, head optimizer)`` for the run."""
    head = make_head(
        cfg.head,
        embedding_size=cfg.model.embedding_size,
        num_classes=num_classes,
        seed=cfg.train.seed,
        device=device,
        precision=precision,
    )
    name, kwargs = cfg.head_optimizer()
    return head, make_head_optimizer(head, name, kwargs)


def build_schedule(cfg: Config, batches_per_epoch: int) -> PolynomialLRWarmup:
    """The warmup + polynomial LR schedule over the run's optimizer steps (``train.max_steps``,
    or ``train.epochs`` of ``batches_per_epoch`` micro-batches)."""
    t, gas = cfg.train, cfg.train.grad_accum
    total = (
        t.max_steps if t.max_steps is not None else max(1, int(t.epochs * batches_per_epoch) // gas)
    )
    warmup = min(total, round(cfg.optim.warmup_epochs * batches_per_epoch / gas))
    return PolynomialLRWarmup(warmup, total, cfg.optim.power)
