"""``build_loader``: the trainer's one seam, from the ``data:`` config to a ``Loader``.

The loaders are imported for the decoder asked for only: ``decoder: nvimgcodec`` must build
where DALI is not installed, and the DALI loaders import DALI at module level.
"""

from __future__ import annotations

import torch

from .config import DataConfig
from .loader import Loader
from .sources import open_dataset


def build_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    device: str | torch.device,
    seed: int = 0,
) -> Loader:
    """Validate the data set and return this rank's ``Loader`` (see ``Loader`` for the contract).

    ``rank``/``world_size`` are the GLOBAL rank and world size: DALI's examples shard by local
    rank, which makes every node read the same shards. Raises ``DataError`` before training
    for bad records (unless ``skip_corrupt``), for any label >= ``num_classes``, and for a
    ``decoder: nvimgcodec`` whose package is not installed.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size {batch_size} must be positive")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    device = torch.device(device)
    if cfg.decoder == "nvimgcodec":
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but torch sees no CUDA device")
    else:
        from .dali import gpu_count

        if device.type == "cuda" and gpu_count() == 0:
            raise ValueError(f"device {device} requested but DALI sees no CUDA device")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device {device}: only cuda and cpu are supported")
    kw = {
        "batch_size": batch_size,
        "rank": rank,
        "world_size": world_size,
        "device": device,
        "seed": seed,
    }
    if cfg.decoder == "nvimgcodec":
        from .codec_loader import CodecLoader
        from .imgcodec import load

        load(gpu=device.type == "cuda")  # a missing package fails before the data set scan
        return CodecLoader(cfg, open_dataset(cfg), **kw)
    from .external import ExternalLoader
    from .native import NativeLoader

    dataset = open_dataset(cfg)
    return (ExternalLoader if cfg.reader == "external" else NativeLoader)(cfg, dataset, **kw)
