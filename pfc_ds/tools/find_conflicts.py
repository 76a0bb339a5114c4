"""Find class centres that look like one identity under two labels, for cleaning the data.

    python -m pfc_ds.tools.find_conflicts CHECKPOINT --threshold 0.7 [--topk K]
        [--output pairs.csv] [--block-rows B] [--truth planted.csv]
    torchrun --nproc_per_node N -m pfc_ds.tools.find_conflicts CHECKPOINT ...   # tiles over N ranks

``CHECKPOINT`` is a training output folder (its newest complete checkpoint), its ``checkpoints``
folder (the tag ``latest`` names), one tag folder, or any folder of ``head_shard_*_of_*.pt``
files. Every world size, bank kind (device, host and disk banks save the same shard files) and
storage dtype (fp32, fp16, bf16) reads the same way: the raw row files are memory-mapped and
scanned block by block (``pfc_ds.tools.conflict_scan``), so memory is a few ``B x B`` blocks,
not the bank. The CSV has ``class_a,class_b,cosine`` (``class_a < class_b``), highest cosine
first. ``--truth`` takes a CSV of known pairs (a header row, then two integer columns, e.g. the
``label_a,label_b`` planted by ``data_pipelines.synth --conflict``) and prints precision and
recall of the pairs found.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from pfc_ds.head.reshard import shard_meta
from pfc_ds.tools.conflict_scan import (
    DEFAULT_BLOCK_ROWS,
    DEFAULT_MAX_PAIRS,
    Bank,
    ScanResult,
    bank_bytes,
    scan,
)
from pfc_ds.train.shard_files import SHARD_RE, find_shards, load_shard

META = "meta.json"  # pfc_ds.train.checkpoint's names; kept here so the tool imports no trainer
LATEST = "latest"
CHECKPOINTS = "checkpoints"


def resolve_shards(src: str | os.PathLike) -> list[Path]:
    """The head shard files of a checkpoint, tag folder, ``checkpoints`` folder or shard folder."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such checkpoint folder")
    names = [p.name for p in src.iterdir()]
    if any(SHARD_RE.match(n) for n in names):
        if any(n.startswith("trainer_state_") for n in names) and META not in names:
            raise FileNotFoundError(f"{src}: incomplete checkpoint (no {META}: a save cut short)")
        return find_shards(src)
    root = src / CHECKPOINTS if (src / CHECKPOINTS).is_dir() else src
    if (root / LATEST).is_file():
        tag = root / (root / LATEST).read_text().strip()
        if not (tag / META).is_file():
            raise FileNotFoundError(f"{tag}: named by {root / LATEST} but incomplete (no {META})")
        return find_shards(tag)
    from pfc_ds.tools.backbone import find_checkpoint  # an output folder without ``latest``

    folder, _ = find_checkpoint(src)
    return find_shards(folder)


def open_bank(shard_paths: Sequence[str | os.PathLike]) -> Bank:
    """The memory-mapped weights of a complete set of head shards (checked against their meta)."""
    shards = [load_shard(p) for p in shard_paths]
    try:
        shard_meta(shards)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{shard_paths[0]}: not a Partial FC head shard ({exc})") from exc
    return Bank([s["weight"] for s in shards], [s["meta"]["class_start"] for s in shards])


def find_conflicts(
    shard_paths: Sequence[str | os.PathLike],
    threshold: float,
    topk: int | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    device: str | None = None,
    distributed: bool | None = None,
) -> list[tuple[int, int, float]]:
    """``(class_a, class_b, cosine)`` of every centre pair above ``threshold``, highest first."""
    return find(
        shard_paths,
        threshold,
        topk,
        block_rows,
        max_pairs=max_pairs,
        device=device,
        distributed=distributed,
    ).pairs()


def find(
    shard_paths: Sequence[str | os.PathLike],
    threshold: float,
    topk: int | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    **kw,
) -> ScanResult:
    """``find_conflicts`` returning the ``ScanResult`` (tensors, truncation flag, timings)."""
    return scan(open_bank(shard_paths), threshold, topk=topk, block_rows=block_rows, **kw)


def write_csv(pairs: Iterable[tuple[int, int, float]], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class_a", "class_b", "cosine"])
        w.writerows((a, b, f"{c:.6f}") for a, b, c in pairs)
    os.replace(tmp, path)


def read_pairs(path: str | os.PathLike) -> set[tuple[int, int]]:
    """Unordered pairs from a CSV: the ``label_a,label_b`` columns when the header names them,
    else the first two columns; a non-integer first row is a header."""
    out = set()
    cols = (0, 1)
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f)):
            if not row or not "".join(row).strip():
                continue
            try:
                a, b = int(row[cols[0]]), int(row[cols[1]])
            except (ValueError, IndexError):
                if n == 0:
                    names = [c.strip() for c in row]
                    if "label_a" in names and "label_b" in names:
                        cols = (names.index("label_a"), names.index("label_b"))
                    continue
                raise ValueError(
                    f"{path}:{n + 1}: expected two integer columns, got {row}"
                ) from None
            out.add((min(a, b), max(a, b)))
    return out


def precision_recall(
    found: Iterable[tuple[int, int]], truth: set[tuple[int, int]]
) -> tuple[float, float, int]:
    """Precision and recall of unordered ``found`` pairs against ``truth``, and the hits."""
    got = {(min(a, b), max(a, b)) for a, b in found}
    hits = len(got & truth)
    precision = hits / len(got) if got else float("nan")
    recall = hits / len(truth) if truth else float("nan")
    return precision, recall, hits


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
        paths = resolve_shards(args.checkpoint)
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
