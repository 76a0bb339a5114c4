"""Where head shards live on disk: file names, discovery, streamed save, memory-mapped load.

A shard is a small ``head_shard_R_of_W.pt`` (RNG states, meta) plus one raw file per row tensor
(``head_shard_R_of_W.pt.weight.bin``, ``.momentum.bin``, ...). The rows stream to disk in
chunks through one reused (pinned, on a GPU) buffer, so a save never holds a host copy of the
bank, and a load memory-maps them, so a reshard reads only the rows it needs. Shared by the
trainer's checkpoints and the offline ``python -m pfc_ds.tools.reshard``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from pfc_ds.head.bank import ROW_STATES
from pfc_ds.head.reshard import shard_header
from pfc_ds.head.row_files import FileRows
from pfc_ds.head.sharding import overlaps, shard_range

SHARD_RE = re.compile(r"head_shard_(\d+)_of_(\d+)\.pt$")
RAW_KEY = "__raw_rows__"
ROW_KEYS = ("weight", *ROW_STATES)  # streamed to raw files; the rest stays in the .pt
# Bytes per streamed chunk: large enough for full disk bandwidth, small beside any bank.
_CHUNK_BYTES = 64 << 20
_NUMPY = {  # torch dtype -> a numpy dtype of the same width (bf16 travels as int16 bits)
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
}
_staging: dict[str, torch.Tensor] = {}


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


def _raw_path(path: Path, key: str) -> Path:
    return path.with_name(f"{path.name}.{key}.bin")


def _stream(t: torch.Tensor, f) -> None:
    """Write ``t``'s bytes in row chunks; a device tensor goes through one reused host buffer."""
    rows = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
    per_row = max(1, rows.shape[1] * rows.element_size())
    step = max(1, _CHUNK_BYTES // per_row)
    npdt = _NUMPY[t.dtype]
    for r0 in range(0, rows.shape[0], step):
        part = rows[r0 : r0 + step]
        if part.device.type != "cpu":
            key, need = f"{part.device}", part.numel() * part.element_size()
            buf = _staging.get(key)
            if buf is None or buf.numel() < need:
                buf = torch.empty(max(need, _CHUNK_BYTES), dtype=torch.uint8, pin_memory=True)
                _staging[key] = buf
            host = buf[: part.numel() * part.element_size()].view(part.dtype).view(part.shape)
            host.copy_(part, non_blocking=True)
            torch.cuda.current_stream(part.device).synchronize()
            part = host
        arr = part.contiguous()
        arr = arr.view(torch.int16) if arr.dtype == torch.bfloat16 else arr
        f.write(arr.numpy().astype(npdt, copy=False).tobytes(order="C"))


def save_shard(state: dict, path: str | os.PathLike) -> list[Path]:
    """Write a head shard atomically: row tensors streamed to raw files (rows already in files,
    ``FileRows``, copied file to file), then the ``.pt``; every file fsynced. Returns the files
    written (raw files first)."""
    path = Path(path)
    small, raws = {}, []
    for key, value in state.items():
        if key in ROW_KEYS and isinstance(value, (torch.Tensor, FileRows)):
            raw = _raw_path(path, key)
            tmp = raw.with_name(raw.name + ".tmp")
            if isinstance(value, FileRows):  # already in files: copy, never read
                value.write_file(tmp)
            else:
                with open(tmp, "wb") as f:
                    _stream(value.detach(), f)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            raws.append((tmp, raw))
            small[key] = {RAW_KEY: raw.name, "dtype": str(value.dtype), "shape": list(value.shape)}
        else:
            small[key] = value
    for tmp, raw in raws:
        os.replace(tmp, raw)
    atomic_save(small, path)
    return [raw for _, raw in raws] + [path]


def load_shard(path: str | os.PathLike) -> dict:
    """Memory-mapped load: a reshard copies only the rows it needs."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    for key, value in list(state.items()):
        if isinstance(value, dict) and RAW_KEY in value:
            state[key] = _map_raw(path.with_name(value[RAW_KEY]), value)
    return state


def file_shard(paths: list[Path], dst_world: int, dst_rank: int, *, seed: int) -> dict:
    """``dst_rank``'s shard of a ``dst_world`` split with its rows left in the source files
    (``FileRows``): loading it reads a chunk at a time, or copies file to file into a disk
    bank, and saving it copies row ranges, so a reshard never holds a shard in memory."""
    first = None
    meta = torch.load(paths[0], map_location="cpu", mmap=True, weights_only=True)["meta"]
    num_classes, emb = meta["num_classes"], meta["embedding_size"]
    _, num = shard_range(num_classes, dst_world, dst_rank)
    rows: dict[str, list] = {}
    refs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for src, src_rows, dst_rows in overlaps(num_classes, len(paths), dst_world, dst_rank):
        small = torch.load(paths[src], map_location="cpu", mmap=True, weights_only=True)
        first = small if first is None else first
        for key in ROW_KEYS:
            ref = small.get(key)
            if isinstance(ref, torch.Tensor):
                raise ValueError(f"{paths[src]}: {key} rows inside the .pt, not in a raw file")
            if ref is None:
                continue
            raw = paths[src].with_name(ref[RAW_KEY])
            dtype, shape = _check_raw(raw, ref)
            if refs.setdefault(key, (dtype, shape[1:]))[0] != dtype:
                raise ValueError(f"{raw}: {dtype} rows, other shards hold {refs[key][0]}")
            n = src_rows.stop - src_rows.start
            rows.setdefault(key, []).append((raw, src_rows.start, dst_rows.start, n))
    if "weight" not in rows:
        raise ValueError(f"{paths[0].parent}: head shards without a weight")
    out = {
        key: FileRows((num, *refs[key][1]), refs[key][0], tuple(pieces))
        for key, pieces in rows.items()
    }
    out.setdefault("momentum", None)
    header = shard_header(first, num_classes, emb, len(paths), dst_world, dst_rank, seed)
    return {**out, **header}


def _check_raw(raw: Path, ref: dict) -> tuple[torch.dtype, tuple[int, ...]]:
    dtype = getattr(torch, ref["dtype"].removeprefix("torch."))
    shape = tuple(ref["shape"])
    want = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    have = raw.stat().st_size if raw.is_file() else -1
    if have != want:
        raise ValueError(f"{raw}: {have} bytes, expected {want} for {ref['dtype']} {list(shape)}")
    return dtype, shape


def _map_raw(raw: Path, ref: dict) -> torch.Tensor:
    dtype, shape = _check_raw(raw, ref)
    arr = np.memmap(raw, dtype=_NUMPY[dtype], mode="c", shape=shape)  # copy-on-write map
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary name, fsync, rename: the path holds the old or the new
    object, never a torn one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
