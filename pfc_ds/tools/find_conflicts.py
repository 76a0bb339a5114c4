"""Find class centres that look like one identity under two labels, for cleaning the data.

    python -m pfc_ds.tools.find_conflicts CHECKPOINT --threshold 0.7 [--topk K]
        [--output pairs.csv] [--block-rows B] [--truth planted.csv]
    torchrun --nproc_per_node N -m pfc_ds.tools.find_conflicts CHECKPOINT ...   # tiles over N ranks

``CHECKPOINT`` is a training output folder (its newest complete checkpoint), its ``checkpoints``
folder (the tag ``latest`` names), one tag folder, or any folder of ``head_shard_*_of_*.pt``
files. Every world size, bank kind (device, host and disk banks save the same shard files) and
storage dtype (fp32, fp16, bf16) reads the same way: the raw row files are memory-mapped and
scanned block by block (``pfc_ds.conflicts.scan``), so memory is a few ``B x B`` blocks,
not the bank. The CSV has ``class_a,class_b,cosine`` (``class_a < class_b``), highest cosine
first. ``--truth`` takes a CSV of known pairs (a header row, then two integer columns, e.g. the
``label_a,label_b`` planted by ``data_pipelines.synth --conflict``) and prints precision and
recall of the pairs found.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from pfc_ds.checkpoint import head_shard_paths
from pfc_ds.conflicts.finder import open_bank, precision_recall, read_pairs, write_csv
from pfc_ds.conflicts.scan import DEFAULT_BLOCK_ROWS, DEFAULT_MAX_PAIRS, bank_bytes, scan


def _init_distributed() -> bool:
    """Join the torchrun process group (NCCL with a GPU, else gloo); False outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return True


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _threshold(text: str) -> float:
    t = float(text)
    if not -1.0 < t < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (-1, 1), got {t}")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pfc_ds.tools.find_conflicts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="output, checkpoints, tag or shard folder")
    p.add_argument("--threshold", type=_threshold, required=True, help="cosine, in (-1, 1)")
    p.add_argument("--topk", type=_positive, help="keep each class's K best pairs (default: all)")
    p.add_argument("--output", help="CSV to write (default: print the first 20 pairs)")
    p.add_argument("--block-rows", type=_positive, default=DEFAULT_BLOCK_ROWS)
    p.add_argument("--max-pairs", type=_positive, default=DEFAULT_MAX_PAIRS)
    p.add_argument("--device", choices=["cpu", "cuda"], help="GEMM device (default: cuda if any)")
    p.add_argument("--truth", help="CSV of known pairs: print precision and recall")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")

    distributed = _init_distributed()
    rank = dist.get_rank() if distributed else 0
    try:
        paths = head_shard_paths(args.checkpoint)
        bank = open_bank(paths)
        truth = read_pairs(args.truth) if args.truth else None
        res = scan(
            bank,
            args.threshold,
            topk=args.topk,
            block_rows=args.block_rows,
            max_pairs=args.max_pairs,
            device=args.device,
            distributed=distributed,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank != 0:
        return 0
    st = res.stats
    print(
        f"{len(paths)} shard(s), {bank.num_classes} classes x {bank.dim} "
        f"({bank_bytes(bank) / 2**30:.2f} GiB) from {paths[0].parent}: "
        f"{len(res.a)} pair(s) with cosine > {args.threshold}; {st['tiles_total']} tiles of "
        f"{st['block_rows']} rows on {st['world']} rank(s), {st['device']}, {st['seconds']:.1f} s"
    )
    if res.truncated:
        print(
            f"warning: more than --max-pairs {args.max_pairs} pairs are above the threshold; "
            "kept the highest. Raise --threshold, set --topk or raise --max-pairs.",
            file=sys.stderr,
        )
    pairs = res.pairs()
    if args.output:
        write_csv(pairs, args.output)
        print(f"wrote {args.output}")
    else:
        for a, b, c in pairs[:20]:
            print(f"{a},{b},{c:.6f}")
    if truth is not None:
        prec, rec, hits = precision_recall(((a, b) for a, b, _ in pairs), truth)
        print(
            json.dumps(
                {
                    "threshold": args.threshold,
                    "found": len(pairs),
                    "planted": len(truth),
                    "hits": hits,
                    "precision": round(prec, 4),
                    "recall": round(rec, 4),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
