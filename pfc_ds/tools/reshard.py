"""Reshard or consolidate Partial FC head shards offline.

    python -m pfc_ds.tools.reshard SRC --world-size N --output DST [--seed S]
    python -m pfc_ds.tools.reshard SRC --consolidate --output head.pt

``SRC`` is a checkpoint tag folder written by the trainer (``head_shard_*_of_*.pt``) or any
folder of such files. ``--world-size N`` writes ``N`` shards in the same naming into ``DST``;
a trainer resumed at ``N`` ranks would do the same by itself, so the tool is for inspection,
export and moving a head into another job. ``--consolidate`` writes one file holding the full
``weight`` (and ``momentum``) in global class order. A reshard copies row ranges between the
raw row files in the kernel, so it never holds a shard in memory. Every row keeps its weight and momentum;
see ``pfc_ds.head.reshard`` for how the sampler RNG is re-seeded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pfc_ds.checkpoint.shard_files import (
    atomic_save,
    file_shard,
    find_shards,
    load_shard,
    save_shard,
    shard_name,
)
from pfc_ds.head.reshard import consolidate, shard_meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pfc_ds.tools.reshard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="folder with head_shard_*_of_*.pt files")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--world-size", type=int, help="number of shards to write")
    mode.add_argument("--consolidate", action="store_true", help="write one full-head file")
    p.add_argument("--output", required=True, help="folder (--world-size) or file (--consolidate)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new sampler RNGs")
    args = p.parse_args(argv)

    paths = find_shards(args.src)
    shards = [load_shard(f) for f in paths]  # memory-mapped: nothing is read yet
    num_classes, emb, world = shard_meta(shards)
    if args.consolidate:
        full = consolidate(shards)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_save(full, args.output)
        print(f"wrote {args.output}: {num_classes} classes x {emb} from {world} shard(s)")
        return 0
    if args.world_size < 1 or args.world_size > num_classes:
        p.error(f"--world-size must be in [1, {num_classes}], got {args.world_size}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(args.world_size):
        # Rows go file to file, a row range at a time: no shard is held in memory.
        shard = file_shard(paths, args.world_size, rank, seed=args.seed)
        save_shard(shard, out / shard_name(rank, args.world_size))
    print(f"wrote {args.world_size} shard(s) of {num_classes} classes x {emb} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
