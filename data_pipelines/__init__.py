"""DALI data pipelines for Partial FC training: insightface RecordIO, image folders, synthetic.

The trainer uses one seam: ``build_loader(cfg, batch_size=, rank=, world_size=, device=)`` with
``cfg = DataConfig.from_dict(yaml["data"])``. This package knows nothing of the trainer.
"""

from .config import DataConfig
from .loader import Loader, build_loader
from .sources import DataError

__all__ = ["DataConfig", "DataError", "Loader", "build_loader"]
