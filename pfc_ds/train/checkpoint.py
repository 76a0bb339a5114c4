"""Checkpoints: the DeepSpeed engine, one head shard per rank, and the trainer's state.

Layout of ``OUTPUT/checkpoints``::

    latest                          tag of the newest *complete* checkpoint (written last)
    step00001234/                   one tag folder per checkpoint
        mp_rank_00_model_states.pt  ... DeepSpeed's files (engine.save_checkpoint)
        head_shard_00000_of_00002.pt    weight, momentum, sampler RNG, sharding meta
        trainer_state_00000.pt          step, epoch, data position, RNG, per rank
        meta.json                       world size, ZeRO stage, precision, sizes (written last)
    universal/step00001234/         DeepSpeed universal checkpoint, made when resuming at a
                                    different world size under ZeRO 1-3

A save is atomic as a whole: every file of ours is written to a temporary name and renamed,
``meta.json`` is written after a barrier once every rank is done, and ``latest`` moves only then.
A run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pfc_ds.head import collectives
from pfc_ds.head.reshard import reshard_shard
from pfc_ds.train.shard_files import (
    atomic_save,
    find_shards,
    load_shard,
    save_shard,
    shard_name,
)

log = logging.getLogger("pfc_ds.train")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
FORMAT = 1


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


# ---- save -------------------------------------------------------------------------------------


def save(
    engine,
    head,
    trainer_state: dict[str, Any],
    output: str | os.PathLike,
    step: int,
    meta: dict[str, Any],
    *,
    keep_last: int = 0,
) -> Path:
    """Save everything of ``step`` on every rank (collective); returns the tag folder."""
    world, rank = collectives.world(None)
    root = Path(output) / CHECKPOINTS
    tag = tag_for(step)
    folder = root / tag
    if (folder / META).is_file():
        return folder  # this step is already saved and complete
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    client_state = {
        UNIVERSAL_CHECKPOINT_INFO: {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE
        }
    }
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    save_shard(head.state_dict(), folder / shard_name(rank, world))  # rows streamed, no copy
    atomic_save({**trainer_state, "rng": rng_state()}, folder / f"trainer_state_{rank:05d}.pt")
    _barrier()
    if rank == 0:
        full_meta = {**meta, "format": FORMAT, "step": step, "world_size": world, "tag": tag}
        _atomic_write_text(folder / META, json.dumps(full_meta, indent=1) + "\n")
        _atomic_write_text(root / LATEST, tag + "\n")
        _prune(root, keep_last, keep=tag)
    _barrier()
    return folder


def _prune(root: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in root.glob("step*") if (p / META).is_file())
    for old in tags[:-keep_last]:
        if old != keep:
            shutil.rmtree(root / old, ignore_errors=True)
            shutil.rmtree(root / "universal" / old, ignore_errors=True)


# ---- find and load ----------------------------------------------------------------------------


def find_latest(output: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """``(tag folder, meta)`` of the newest complete checkpoint under ``output``, or None."""
    root = Path(output) / CHECKPOINTS
    latest = root / LATEST
    if not latest.is_file():
        return None
    folder = root / latest.read_text().strip()
    meta_path = folder / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{latest} points to {folder}, which has no {META}")
    return folder, json.loads(meta_path.read_text())


def load_head(head, folder: Path, meta: dict[str, Any], *, seed: int) -> None:
    """Load this rank's head shard, resharding exactly if the world size changed."""
    world, rank = collectives.world(None)
    paths = find_shards(folder)
    src_world = len(paths)
    if src_world == world:
        head.load_state_dict(load_shard(paths[rank]))
        return
    shard = reshard_shard(
        lambda r: load_shard(paths[r]),
        num_classes=meta["num_classes"],
        embedding_size=meta["embedding_size"],
        src_world=src_world,
        dst_world=world,
        dst_rank=rank,
        seed=seed,
    )
    head.load_state_dict(shard)
    if rank == 0:
        log.info("resharded the head from %d to %d ranks (sampler RNG re-seeded)", src_world, world)


def load_trainer_state(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """This rank's trainer state; after a world-size change, rank 0's without its RNG."""
    world, rank = collectives.world(None)
    if meta["world_size"] == world:
        return torch.load(folder / f"trainer_state_{rank:05d}.pt", weights_only=False)
    state = torch.load(folder / "trainer_state_00000.pt", weights_only=False)
    state.pop("rng", None)
    return state


def consolidated_backbone(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's fp32 weights from a checkpoint of any ZeRO stage and world size."""
    if meta["zero_stage"] == 0:
        states = torch.load(
            folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        out = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
        # Under fp16/bf16 the module holds rounded copies; the optimizer has the fp32 masters,
        # in the order of ``meta["trained_params"]`` (absent in older checkpoints).
        masters = (states.get("optimizer") or {}).get("fp32_groups")
        if masters and meta.get("trained_params"):
            flat = [t for group in masters for t in group]
            for name, value in zip(meta["trained_params"], flat, strict=True):
                out[name] = value.detach().float().reshape(out[name].shape).clone()
        return out
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    return {k: v.float() if v.is_floating_point() else v for k, v in full.items()}


def make_universal(folder: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (rank 0 converts; collective).

    Raises ``RuntimeError`` on every rank if the conversion failed on rank 0.
    """
    world, rank = collectives.world(None)
    out = folder.parent / "universal" / folder.name
    error = None
    if rank == 0 and not (out / ".complete").is_file():
        try:
            _convert_to_universal(folder, out)
        except Exception as exc:  # DeepSpeed's converter supports only some optimizers
            error = f"{type(exc).__name__}: {exc}"
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RuntimeError(error)
    return out


def _convert_to_universal(folder: Path, out: Path) -> None:
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(
        input_folder=str(folder),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    (out / ".complete").write_text("")
