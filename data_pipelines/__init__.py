"""Data pipelines for Partial FC training: insightface RecordIO and image folders, decoded by
DALI (the default) or by nvImageCodec without DALI (``data.decoder: nvimgcodec``).

The trainer uses one seam: ``build_loader(cfg, batch_size=, rank=, world_size=, device=)`` with
``cfg = DataConfig.from_dict(yaml["data"])``. This package knows nothing of the trainer.

The exports load lazily so that the command-line tools and their worker processes (``check``,
``pack``, ``synth``) start without importing torch and DALI.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .build import build_loader
    from .config import DataConfig
    from .loader import Loader
    from .sources import DataError

__all__ = ["DataConfig", "DataError", "Loader", "build_loader"]
_HOME = {
    "DataConfig": ".config",
    "DataError": ".sources",
    "Loader": ".loader",
    "build_loader": ".build",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(import_module(_HOME[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
