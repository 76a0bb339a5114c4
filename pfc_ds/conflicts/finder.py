"""Centre pairs that look like one identity under two labels: the finder over a checkpoint's
head shards (memory-mapped, scanned block by block by ``pfc_ds.conflicts.scan``), and the CSV
of pairs it reads and writes."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from pfc_ds.checkpoint.shard_files import load_shard
from pfc_ds.conflicts.scan import DEFAULT_BLOCK_ROWS, DEFAULT_MAX_PAIRS, Bank, ScanResult, scan
from pfc_ds.head.reshard import shard_meta


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
