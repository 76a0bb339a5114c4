"""Writing a checkpoint: atomic as a whole, durable, and refused early when it cannot fit.

A save first checks the free space against the last checkpoint's size on every rank; each rank
writes its files (ours under temporary names, renamed), fsyncs them and their folder and
checksums them; rank 0 gathers the lists, writes ``meta.json`` (the commit point) and then
``latest``, each fsynced, and prunes. A tag without ``meta.json`` is never read and is removed
by the next save, so a kill, a crash or a full disk at any moment leaves the previous
checkpoints as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pfc_ds.checkpoint import comm, integrity
from pfc_ds.checkpoint.layout import (
    FORMAT,
    LATEST,
    META,
    CheckpointError,
    CheckpointRef,
    checkpoints_root,
    prune,
    read_ref,
    tag_for,
)
from pfc_ds.checkpoint.rng import rng_state
from pfc_ds.checkpoint.shard_files import ROW_KEYS, atomic_save, save_shard, shard_name


@dataclass(frozen=True)
class FileHooks:
    """Called around every checkpoint file: fault injection, the watchdog's heartbeat."""

    before: Callable[[Path], None] = lambda path: None
    after: Callable[[Path], None] = lambda path: None


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def space_short(root: Path, need: int, group=None) -> tuple[int, int] | None:
    """``(rank, free bytes)`` of the first rank with less than ``need`` bytes free on the file
    system of ``root``, or ``None``; collective, so every rank gets the same answer."""
    rank = comm.world()[1]
    short = [(r, f) for r, f in comm.gather_objects((rank, free_bytes(root)), group) if f < need]
    return short[0] if short else None


_OPTIMIZER_STATES = {"sgd": 1, "adamw": 2}  # fp32 tensors per parameter in the optimizer
_PER_RANK_BYTES = 20 << 10  # trainer state (RNG states, data position), head shard's .pt


def estimate_bytes(engine, head, optim_name: str, momentum: float, *, rank: int) -> int:
    """This rank's estimate of one checkpoint's bytes on disk (sum it over the ranks).

    Head: this rank's row tensors as they are stored, plus 20 KB of trainer state. Backbone
    (counted on rank 0): the module's parameters in their dtype, fp32 masters under fp16/bf16,
    and the optimizer's state tensors.
    """
    state = head.state_dict()
    total = _PER_RANK_BYTES + sum(
        t.numel() * t.element_size()
        for k in ROW_KEYS
        if isinstance(t := state.get(k), torch.Tensor)
    )
    if rank == 0:
        params = [p for p in engine.module.parameters() if p.requires_grad]
        numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
        item = params[0].element_size() if params else 4
        states = _OPTIMIZER_STATES.get(optim_name, 2) if momentum or optim_name != "sgd" else 0
        total += numel * (item + (4 if item < 4 else 0) + 4 * states)
    return total


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


def _universal_info() -> dict[str, Any]:
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}  # fmt: skip


def _write_rank_files(
    engine, head, trainer_state: dict, folder: Path, hooks: FileHooks
) -> list[Path]:
    """This rank's files of the tag: DeepSpeed's, the head shard, the trainer state."""
    world, rank = comm.world()
    written: list[Path] = []
    with _recording(engine, written, hooks):
        engine.save_checkpoint(
            str(folder.parent), tag=folder.name, client_state=_universal_info(), save_latest=False
        )
    shard = folder / shard_name(rank, world)
    hooks.before(shard)
    for path in save_shard(head.file_state(), shard):  # rows streamed (or files copied)
        written.append(path)
        hooks.after(path)
    state_path = folder / f"trainer_state_{rank:05d}.pt"
    hooks.before(state_path)
    atomic_save({**trainer_state, "rng": rng_state()}, state_path)
    written.append(state_path)
    hooks.after(state_path)
    integrity.fsync_dir(folder)
    return written


def _commit(folder: Path, files: dict[str, dict], meta: dict, step: int, world: int) -> None:
    """Rank 0: ``meta.json`` (the commit point), then ``latest``."""
    for path in sorted(folder.rglob("*")):  # DeepSpeed's extras (zero_to_fp32.py, ...)
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in files and not name.endswith(".tmp"):
            integrity.fsync_file(path)
            files[name] = {**integrity.record(path), "rank": 0}
    full = {**meta, "format": FORMAT, "step": step, "world_size": world, "tag": folder.name,
            "bytes": sum(rec["size"] for rec in files.values()), "files": files}  # fmt: skip
    integrity.atomic_write_text(folder / META, json.dumps(full, indent=1) + "\n")
    integrity.atomic_write_text(folder.parent / LATEST, folder.name + "\n")


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
) -> CheckpointRef:
    """Save everything of ``step`` on every rank (collective); returns the checkpoint.

    ``need_bytes``: free space every rank must see first (the last checkpoint's size).
    ``protect``: tags pruning must keep besides the newest ``keep_last`` (the one resumed from).
    Raises ``CheckpointError`` on every rank, with the tag removed, when a rank is short of space
    or a write fails; the previous checkpoints are untouched.
    """
    world, rank = comm.world()
    hooks = hooks or FileHooks()
    root = checkpoints_root(output)
    folder = root / tag_for(step)
    if (folder / META).is_file():
        return read_ref(folder)  # this step is already saved and complete
    if rank == 0 and folder.exists():
        shutil.rmtree(folder)  # an interrupted save of this step; its files are not ours now
    short = space_short(root, need_bytes, group)  # also a barrier: the folder is clean now
    if short is not None:
        raise CheckpointError(
            f"checkpoint of step {step} not written: {size_text(short[1])} free on {root} "
            f"(rank {short[0]}), the last checkpoint took {size_text(need_bytes)}; free disk "
            "space or lower train.keep_last",
            path=root, free=short[1], need=need_bytes, rank=short[0],
        )  # fmt: skip
    records: dict[str, dict[str, Any]] = {}
    error = None
    try:
        written = _write_rank_files(engine, head, trainer_state, folder, hooks)
        records = {p.name: {**integrity.record(p), "rank": rank} for p in written}
    except OSError as exc:  # ENOSPC, EDQUOT, EIO: every rank learns it below and gives up
        error = (rank, f"rank {rank}: {type(exc).__name__}: {exc}")
    gathered = comm.gather_objects((records, error), group)
    errors = [e for _, e in gathered if e]
    if errors:
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        comm.barrier(group)
        raise CheckpointError(f"checkpoint of step {step} not written: {errors[0][1]}",
                              path=folder, rank=errors[0][0])  # fmt: skip
    if rank == 0:
        files = {name: rec for recs, _ in gathered for name, rec in recs.items()}
        _commit(folder, files, meta, step, world)
        prune(root, keep_last, keep={folder.name, *protect})
    comm.barrier(group)
    return read_ref(folder)
