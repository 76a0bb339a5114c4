"""Checkpoints: the DeepSpeed engine, one head shard per rank, and the trainer's state.

Layout of ``OUTPUT/checkpoints``::

    latest                          tag of the newest *complete* checkpoint (written last)
    step00001234/                   one tag folder per checkpoint
        mp_rank_00_model_states.pt  ... DeepSpeed's files (engine.save_checkpoint)
        head_shard_00000_of_00002.pt    sampler RNG, sharding meta; rows in ``.pt.weight.bin`` ...
        trainer_state_00000.pt          step, epoch, data position, RNG, LR factor, per rank
        meta.json                       world size, ZeRO stage, precision, and every file of the
                                        tag with its size and checksum (written last)
    step00001234.damaged/           a tag that failed verification on load (kept for a look)
    universal/step00001234/         DeepSpeed universal checkpoint, made when resuming at a
                                    different world size under ZeRO 1-3

A save is atomic as a whole and durable: it first checks the free space against the last
checkpoint's size on every rank; each rank writes its files (ours under temporary names,
renamed), fsyncs them and their folder and checksums them; rank 0 gathers the lists, writes
``meta.json`` (the commit point) and then ``latest``, each fsynced. A tag without ``meta.json``
(a save cut short by a kill, a crash or a full disk) is never read and is removed by the next
save. A load verifies the tag's files against ``meta.json`` (each rank a share) and falls back
to the previous complete tag when one is missing, truncated or corrupt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pfc_ds.head import collectives
from pfc_ds.head.reshard import reshard_shard
from pfc_ds.train import integrity
from pfc_ds.train.shard_files import (
    atomic_save,
    file_shard,
    find_shards,
    load_shard,
    save_shard,
    shard_name,
)

log = logging.getLogger("pfc_ds.train")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
DAMAGED = ".damaged"
FORMAT = 2  # 2: meta.json lists every file with its size and checksum
TAG_RE = re.compile(r"step(\d{8,})")


class CheckpointError(Exception):
    """A checkpoint could not be written (the previous ones are intact) or none can be read."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def barrier(group=None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def gather_objects(obj: Any, group=None) -> list[Any]:
    """Every rank's ``obj`` in rank order (a host-side collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


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


def seed_host_rngs(seed: int) -> None:
    """Seed Python's and numpy's global RNGs (both are part of ``rng_state``)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


# ---- save -------------------------------------------------------------------------------------


class FileHooks:
    """Called around every checkpoint file: fault injection, the watchdog's heartbeat."""

    def __init__(
        self,
        before: Callable[[Path], None] | None = None,
        after: Callable[[Path], None] | None = None,
    ) -> None:
        self.before = before or (lambda path: None)
        self.after = after or (lambda path: None)


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def space_short(root: Path, need: int, group=None) -> tuple[int, int] | None:
    """``(rank, free bytes)`` of the first rank with less than ``need`` bytes free on the file
    system of ``root``, or ``None``; collective, so every rank gets the same answer."""
    rank = collectives.world(None)[1]
    free = free_bytes(root)
    short = [(r, f) for r, f in gather_objects((rank, free), group) if f < need]
    return short[0] if short else None


@contextlib.contextmanager
def _recording(engine, written: list[Path], hooks: FileHooks) -> Iterator[None]:
    """Route DeepSpeed's file writes through ``hooks``, fsync them, and note their paths."""
    engine_ = engine.checkpoint_engine
    original = engine_.save

    def save(state_dict, path):
        path = Path(path)
        hooks.before(path)
        original(state_dict, str(path))
        integrity.fsync_file(path)
        written.append(path)
        hooks.after(path)

    engine_.save = save
    try:
        yield
    finally:
        del engine_.save  # the class's method again


def save(
    engine,
    head,
    trainer_state: dict[str, Any],
    output: str | os.PathLike,
    step: int,
    meta: dict[str, Any],
    *,
    keep_last: int = 0,
    need_bytes: int = 0,
    protect: tuple[str, ...] = (),
    group=None,
    hooks: FileHooks | None = None,
) -> Path:
    """Save everything of ``step`` on every rank (collective); returns the tag folder.

    ``need_bytes``: free space every rank must see first (the last checkpoint's size).
    ``protect``: tags pruning must keep besides the newest ``keep_last`` (the one resumed from).
    Raises ``CheckpointError`` on every rank, with the tag removed, when a rank is short of space
    or a write fails; the previous checkpoints are untouched.
    """
    world, rank = collectives.world(None)
    hooks = hooks or FileHooks()
    root = Path(output) / CHECKPOINTS
    tag = tag_for(step)
    folder = root / tag
    if (folder / META).is_file():
        return folder  # this step is already saved and complete
    if rank == 0 and folder.exists():
        shutil.rmtree(folder)  # an interrupted save of this step; its files are not ours now
    short = space_short(root, need_bytes, group)  # also a barrier: the folder is clean now
    if short is not None:
        raise CheckpointError(
            f"checkpoint of step {step} not written: {size_text(short[1])} free on {root} "
            f"(rank {short[0]}), the last checkpoint took {size_text(need_bytes)}; free disk "
            "space or lower train.keep_last"
        )
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
    written: list[Path] = []
    records: dict[str, dict[str, Any]] = {}
    error = None
    try:
        with _recording(engine, written, hooks):
            engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        shard = folder / shard_name(rank, world)
        hooks.before(shard)
        state = {**head.state_dict(), **head.bank.file_rows()}  # a disk bank's files are copied
        for path in save_shard(state, shard):  # rows streamed, no copy in memory
            written.append(path)
            hooks.after(path)
        state_path = folder / f"trainer_state_{rank:05d}.pt"
        hooks.before(state_path)
        atomic_save({**trainer_state, "rng": rng_state()}, state_path)
        written.append(state_path)
        hooks.after(state_path)
        integrity.fsync_dir(folder)
        records = {p.name: {**integrity.record(p), "rank": rank} for p in written}
    except OSError as exc:  # ENOSPC, EDQUOT, EIO: every rank learns it below and gives up
        error = f"rank {rank}: {type(exc).__name__}: {exc}"
    gathered = gather_objects((records, error), group)
    errors = [e for _, e in gathered if e]
    if errors:
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        barrier(group)
        raise CheckpointError(f"checkpoint of step {step} not written: {errors[0]}")
    if rank == 0:
        files = {name: rec for recs, _ in gathered for name, rec in recs.items()}
        for path in sorted(folder.rglob("*")):  # DeepSpeed's extras (zero_to_fp32.py, ...)
            name = path.relative_to(folder).as_posix()
            if path.is_file() and name not in files and not name.endswith(".tmp"):
                integrity.fsync_file(path)
                files[name] = {**integrity.record(path), "rank": 0}
        full_meta = {
            **meta,
            "format": FORMAT,
            "step": step,
            "world_size": world,
            "tag": tag,
            "bytes": sum(rec["size"] for rec in files.values()),
            "files": files,
        }
        integrity.atomic_write_text(folder / META, json.dumps(full_meta, indent=1) + "\n")
        integrity.atomic_write_text(root / LATEST, tag + "\n")
        _prune(root, keep_last, keep={tag, *protect})
    barrier(group)
    return folder


def _tags(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every tag folder, complete or not, newest first."""
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if (m := TAG_RE.fullmatch(p.name))]
    return sorted(out, reverse=True)


def _prune(root: Path, keep_last: int, keep: set[str]) -> None:
    """Keep the newest ``keep_last`` complete tags, ``keep``, and the tag ``latest`` names;
    remove older complete tags and every incomplete one (a save cut short)."""
    if keep_last <= 0:
        return
    latest = root / LATEST
    if latest.is_file():
        keep = keep | {latest.read_text().strip()}
    complete = [p for _, p in _tags(root) if (p / META).is_file()]
    keep |= {p.name for p in complete[:keep_last]}
    for _, folder in _tags(root):
        if folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(root / "universal" / folder.name, ignore_errors=True)


# ---- find, verify and load -------------------------------------------------------------------


def candidates(output: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """``(tag folder, meta)`` of every complete checkpoint under ``output``, newest first.

    Complete means a readable ``meta.json`` (written only once every rank's files were), not
    necessarily intact: ``verify`` reads the files.
    """
    out = []
    for _, folder in _tags(Path(output) / CHECKPOINTS):
        path = folder / META
        if not path.is_file():
            continue
        try:
            out.append((folder, json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s); skipping %s", path, exc, folder.name)
    return out


def incomplete(output: str | os.PathLike) -> list[Path]:
    """Tag folders without ``meta.json``: saves that were cut short."""
    return [p for _, p in _tags(Path(output) / CHECKPOINTS) if not (p / META).is_file()]


def find_latest(output: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """``(tag folder, meta)`` of the newest complete checkpoint under ``output``, or None."""
    found = candidates(output)
    return found[0] if found else None


def verify(folder: Path, meta: dict[str, Any], group=None) -> list[str]:
    """Problems of ``folder``'s files against ``meta`` (empty: intact). Collective: each rank
    reads a share of the files and every rank gets the same list. Checkpoints written before
    file lists (format 1) have nothing to check."""
    files = meta.get("files")
    if not files:
        return []
    world, rank = collectives.world(None)
    names = sorted(files)
    mine = [integrity.problem(folder, n, files[n]) for n in names[rank::world]]
    return sorted(p for part in gather_objects([p for p in mine if p], group) for p in part)


def set_aside(folder: Path) -> Path:
    """Rename a damaged tag out of the way (rank 0), so no resume or save reads it again."""
    target = folder.with_name(folder.name + DAMAGED)
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}{DAMAGED}{n}")
    os.replace(folder, target)
    integrity.fsync_dir(folder.parent)
    return target


def load_head(head, folder: Path, meta: dict[str, Any], *, seed: int) -> None:
    """Load this rank's head shard, resharding exactly if the world size changed. The rows go
    from the checkpoint's files into the bank a chunk at a time (file to file for a disk bank),
    never as a whole shard in memory."""
    world, rank = collectives.world(None)
    paths = find_shards(folder)
    src_world = len(paths)
    shard = file_shard(paths, world, rank, seed=seed)
    if shard is None:  # an older single-.pt shard
        if src_world == world:
            shard = load_shard(paths[rank])
        else:
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
    if rank == 0 and src_world != world:
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
