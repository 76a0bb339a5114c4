"""Checkpoint save, load and reshard of a disk bank: file-to-file copies against the streamed and
in-memory paths, and against the disk's floor.

    python -m pfc_ds.bench.bank_files [--ids 10000000] [--dim 128] [--dir SCRATCH] [--json OUT]

One ``DiskBank`` shard (fp16 weight and momentum) is built once; each operation then runs in a
fresh process, so its peak RSS is its own:

- save, ``file_rows`` (the trainer's path for a disk bank): the bank's files copied in the
  kernel, against the streamed save every other bank uses (the rows read through the mapping);
- reshard 1 -> 3 ranks, file to file (``file_shard``, what the trainer and
  ``pfc_ds.tools.reshard`` do), against the in-memory ``reshard_shard``;
- load into a fresh disk bank, file to file, against the tensor copy of a memory-mapped shard.

The floor is the bytes written over the disk's sequential write rate, measured in the same run
(1 GiB, fsynced).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import time
from pathlib import Path


def _bank(folder: Path, ids: int, dim: int):
    import torch

    from pfc_ds.head.host_bank import DiskBank

    return DiskBank(
        folder, seed=0, class_start=0, num_local=ids, embedding_size=dim,
        dtype=torch.float16, device="cpu", rank=0, world_size=1,
    )  # fmt: skip


def _meta(ids: int, dim: int) -> dict:
    return {"num_classes": ids, "world_size": 1, "rank": 0, "class_start": 0, "num_local": ids,
            "embedding_size": dim}  # fmt: skip


def _op(kind: str, root: str, ids: int, dim: int, queue) -> None:
    import torch

    from pfc_ds.checkpoint.shard_files import (
        file_shard,
        find_shards,
        load_shard,
        save_shard,
        shard_name,
    )
    from pfc_ds.head.bank import CenterBank
    from pfc_ds.head.reshard import reshard_shard

    root_p = Path(root)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    written = 0
    if kind.startswith("save"):
        weight, momentum = (_open(root_p / "bank" / f"bank_00000_of_00001.{n}.bin", ids, dim)
                            for n in ("weight", "momentum"))  # fmt: skip
        state = {"weight": weight, "momentum": momentum, "rng": torch.tensor([0, 0]),
                 "meta": _meta(ids, dim)}  # fmt: skip
        if kind == "save_files":
            from pfc_ds.head.row_files import FileRows

            state.update({
                n: FileRows((ids, dim), weight.dtype,
                            ((root_p / "bank" / f"bank_00000_of_00001.{n}.bin", 0, 0, ids),))
                for n in ("weight", "momentum")
            })  # fmt: skip
        out = root_p / kind
        out.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        save_shard(state, out / shard_name(0, 1))
        written = 2 * ids * dim * 2
    elif kind.startswith("reshard"):
        paths = find_shards(root_p / "save_files")
        out = root_p / kind
        out.mkdir(exist_ok=True)
        for rank in range(3):
            if kind == "reshard_files":
                shard = file_shard(paths, 3, rank, seed=0)
            else:
                shard = reshard_shard(lambda r: load_shard(paths[r]), num_classes=ids,
                                      embedding_size=dim, src_world=1, dst_world=3, dst_rank=rank)  # fmt: skip
            save_shard(shard, out / shard_name(rank, 3))
            del shard
        written = 2 * ids * dim * 2
    else:  # load into a fresh disk bank of the same shape
        paths = find_shards(root_p / "save_files")
        target = root_p / f"{kind}_bank"
        bank = _bank(target, ids, dim)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        shard = file_shard(paths, 1, 0, seed=0) if kind == "load_files" else load_shard(paths[0])
        CenterBank.load(bank, shard["weight"], {"momentum": shard["momentum"]})
        bank.flush()
        written = 2 * ids * dim * 2
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"op": kind, "seconds": seconds, "bytes": written, "peak_mb": peak / 1024,
               "growth_mb": (peak - base) / 1024})  # fmt: skip


def _open(path: Path, ids: int, dim: int):
    import numpy as np
    import torch

    return torch.from_numpy(np.memmap(path, dtype=np.float16, mode="r+", shape=(ids, dim)))


def _run(kind: str, root: Path, ids: int, dim: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_op, args=(kind, str(root), ids, dim, q))
    p.start()
    out = q.get()
    p.join()
    return out


def _write_rate(root: Path) -> float:
    """Sequential write bandwidth, bytes/s (1 GiB, fsynced)."""
    buf = os.urandom(64 << 20)
    path = root / "rate.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(16):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    rate = (16 * len(buf)) / (time.perf_counter() - t0)
    path.unlink()
    return rate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pfc_ds.bench.bank_files", description=__doc__)
    ap.add_argument("--ids", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dir", default="/tmp/pfc_bank_files")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    bank = _bank(root / "bank", a.ids, a.dim)
    bank.ensure_state("momentum")
    bank.flush()
    bank.file_of("momentum").unlink()  # a dense momentum: the weight's bytes
    shutil.copyfile(bank.file_of("weight"), bank.file_of("momentum"))
    del bank
    build = time.perf_counter() - t0
    rate = _write_rate(root)
    rows = []
    for kind in ("save_files", "save_stream", "reshard_files", "reshard_memory",
                 "load_files", "load_tensor"):  # fmt: skip
        r = _run(kind, root, a.ids, a.dim)
        r["floor_s"] = r["bytes"] / rate
        rows.append(r)
        shutil.rmtree(root / f"{kind}_bank", ignore_errors=True)
    gb = 2 * a.ids * a.dim * 2 / 1e9
    print(f"{a.ids:,} ids x {a.dim}, fp16 weight + momentum = {gb:.2f} GB; build {build:.1f} s; "
          f"disk write {rate / 1e9:.2f} GB/s")  # fmt: skip
    print("| operation | time | / floor | peak RSS | RSS growth |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['seconds']:.1f} s | {r['seconds'] / r['floor_s']:.2f}x | "
              f"{r['peak_mb']:,.0f} MB | {r['growth_mb']:,.0f} MB |")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps({"ids": a.ids, "dim": a.dim, "write_rate": rate,
                                            "build_s": build, "ops": rows}, indent=1))  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
