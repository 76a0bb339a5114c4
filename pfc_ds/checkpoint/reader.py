"""Reading a checkpoint back: verification against ``meta.json``, the head shard (resharded
exactly at another world size), the trainer state, and the backbone's fp32 weights."""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from pfc_ds.checkpoint import comm, integrity
from pfc_ds.checkpoint.layout import CheckpointRef, open_checkpoint
from pfc_ds.checkpoint.shard_files import file_shard

log = logging.getLogger("pfc_ds.checkpoint")


def verify(ref: CheckpointRef, group=None) -> list[str]:
    """Problems of the checkpoint's files against its ``meta.json`` (empty: intact).
    Collective: each rank reads a share of the files and every rank gets the same list."""
    files = ref.meta.get("files") or {}
    if not files:
        return [f"{ref.folder}/meta.json lists no files"]
    world, rank = comm.world()
    names = sorted(files)
    mine = [integrity.problem(ref.folder, n, files[n]) for n in names[rank::world]]
    return sorted(p for part in comm.gather_objects([p for p in mine if p], group) for p in part)


def load_head(head, ref: CheckpointRef, *, seed: int) -> None:
    """Load this rank's head shard, resharding exactly if the world size changed (the sampler
    is re-seeded from ``seed`` then). The rows go from the checkpoint's files into the bank a
    chunk at a time (file to file for a disk bank), never as a whole shard in memory."""
    world, rank = comm.world()
    paths = ref.head_shards()
    head.load_state_dict(file_shard(paths, world, rank, seed=seed))
    if rank == 0 and len(paths) != world:
        log.info(
            "resharded the head from %d to %d ranks (sampler RNG re-seeded)", len(paths), world
        )


def load_trainer_state(ref: CheckpointRef) -> dict[str, Any]:
    """This rank's trainer state; after a world-size change, rank 0's without its RNG."""
    world, rank = comm.world()
    if ref.world_size == world:
        return torch.load(ref.trainer_state_path(rank), weights_only=False)
    state = torch.load(ref.trainer_state_path(0), weights_only=False)
    state.pop("rng", None)
    return state


def consolidated_backbone(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The backbone's fp32 weights from a checkpoint of any ZeRO stage and world size."""
    if ref.zero_stage == 0:
        states = torch.load(
            ref.folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        out = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
        # Under fp16/bf16 the module holds rounded copies; the optimizer has the fp32 masters,
        # in the order of ``meta["trained_params"]``.
        masters = (states.get("optimizer") or {}).get("fp32_groups")
        if masters:
            flat = [t for group in masters for t in group]
            for name, value in zip(ref.meta["trained_params"], flat, strict=True):
                out[name] = value.detach().float().reshape(out[name].shape).clone()
        return out
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
    return {k: v.float() if v.is_floating_point() else v for k, v in full.items()}


def load_backbone(path) -> tuple[torch.nn.Module, CheckpointRef]:
    """The fp32 backbone of the checkpoint ``path`` means (any ZeRO stage), built as its meta
    names it, loaded strictly, in eval mode; with the checkpoint."""
    from pfc_ds.backbones import get_backbone

    ref = open_checkpoint(path)
    meta = ref.meta
    model = get_backbone(
        meta["backbone"], meta["embedding_size"], **meta.get("backbone_options", {})
    )
    model.load_state_dict(consolidated_backbone(ref), strict=True)
    return model.float().eval(), ref


def make_universal(ref: CheckpointRef) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (rank 0 converts; collective).

    Raises ``RuntimeError`` on every rank if the conversion failed on rank 0.
    """
    out = ref.universal
    error = None
    if comm.world()[1] == 0 and not (out / ".complete").is_file():
        try:
            _convert_to_universal(ref.folder, out)
        except Exception as exc:  # DeepSpeed's converter supports only some optimizers
            error = f"{type(exc).__name__}: {exc}"
    error = comm.broadcast_object(error)
    if error is not None:
        raise RuntimeError(error)
    return out


def _convert_to_universal(folder: Path, out: Path) -> None:
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
