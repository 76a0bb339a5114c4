"""Where head shards live on disk: file names, discovery, memory-mapped load, atomic save.

Shared by the trainer's checkpoints and the offline ``python -m pfc_ds.tools.reshard``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

SHARD_RE = re.compile(r"head_shard_(\d+)_of_(\d+)\.pt$")


def shard_name(rank: int, world_size: int) -> str:
    return f"head_shard_{rank:05d}_of_{world_size:05d}.pt"


def find_shards(folder: str | os.PathLike) -> list[Path]:
    """The shard files of ``folder`` in rank order; raises if the set is incomplete."""
    found: dict[int, Path] = {}
    worlds = set()
    for path in Path(folder).iterdir():
        m = SHARD_RE.match(path.name)
        if m:
            found[int(m.group(1))] = path
            worlds.add(int(m.group(2)))
    if not found:
        raise FileNotFoundError(f"no head_shard_*_of_*.pt files in {folder}")
    if len(worlds) != 1:
        raise ValueError(f"{folder} mixes shards of world sizes {sorted(worlds)}")
    world = worlds.pop()
    missing = sorted(set(range(world)) - set(found))
    if missing:
        raise FileNotFoundError(f"{folder}: shards of rank(s) {missing} of {world} are missing")
    return [found[r] for r in range(world)]


def load_shard(path: str | os.PathLike) -> dict:
    """Memory-mapped load: a reshard copies only the rows it needs."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def atomic_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
