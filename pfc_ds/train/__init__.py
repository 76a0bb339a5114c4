"""The DeepSpeed trainer: config, engine + head lockstep, step loop, checkpoints, metrics.

``from pfc_ds.train import Trainer, load_config`` is the whole public surface; the modules are
imported lazily so ``pfc_ds.train.config`` stays cheap (no DeepSpeed import).
"""

from __future__ import annotations

from typing import Any

__all__ = ["USER_ERRORS", "Config", "Trainer", "load_config"]


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from pfc_ds.train.loop import Trainer

        return Trainer
    if name == "USER_ERRORS":
        from pfc_ds.train.errors import USER_ERRORS

        return USER_ERRORS
    if name in ("Config", "load_config"):
        from pfc_ds.train import config

        return getattr(config, name)
    raise AttributeError(name)
