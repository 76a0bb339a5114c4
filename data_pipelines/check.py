"""Validate a data set before a run: ``python -m data_pipelines.check PATH [--full] [--all]``.

PATH is a ``.rec`` prefix (``train``, ``train.rec``) or a folder of identity folders. Prints one
summary line ``images=N classes=C min_label=.. max_label=..`` and one line per problem with its
record key and byte offset: bad magic, truncated records, non-integer labels, labels >= the
declared class count, JPEGs that do not decode (a sample, or all with ``--full``). A badly cut
file has a problem per record, so only the first 20 are listed unless ``--all``. Exits 1 on
any problem, so it can gate a launch script, and 2 with one ``error:`` line when PATH cannot be
read at all (a missing ``.idx``: rebuild it with ``python -m data_pipelines.index``), or when an
insightface file's header, identity records and ``.idx`` disagree.

Without ``--full`` an insightface file's labels come from its identity records (``layout.py``)
and only the sampled image records are read; ``--full`` reads every record's header (``scan``)
and decodes every image. Either way the index is built in a temporary folder in chunks and
decoded in chunks, so memory stays bounded (about 1 GB at 42M records).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .cache import build_table
from .folder import scan_folder
from .insightface import IMAGE_SIZE, split_prefix
from .jpeg import decode_error, image_size
from .pool import mapper
from .recordio import BadRecord
from .scan import Problem, check_label_range, property_classes, require_files
from .table import open_table

_CHUNK = 256
_FULL_CHUNK = 4096  # images per decode task with --full
_SHOWN = 20  # problems listed without --all


def _decode_rec_chunk(
    args: tuple[str, str, np.ndarray],
) -> tuple[int, list[tuple[int, str, str]], int, str | None]:
    """Decode images ``indices`` of the table in ``table_dir``: (decoded, [(i, kind, why)] of
    the failures, count of images not 112x112, the first of them)."""
    rec_path, table_dir, indices = args
    scan = open_table(table_dir, rec_path)
    assert scan is not None
    mm = np.memmap(rec_path, dtype=np.uint8, mode="r")
    failures, odd, first_odd = [], 0, None
    for i in indices.tolist():
        try:
            data = scan.image_bytes(mm, i)
        except BadRecord as exc:
            failures.append((i, exc.kind, exc.detail))
            continue
        _, why, size = _decode_one(i, data)
        if why is not None:
            failures.append((i, "decode", why))
        elif size != (IMAGE_SIZE, IMAGE_SIZE):
            odd += 1
            first_odd = first_odd or f"key={int(scan.keys[i])} is {size[0]}x{size[1]}"
    return len(indices), failures, odd, first_odd


def _decode_file_chunk(items: list[tuple[int, str]]) -> list[tuple[int, str | None, tuple]]:
    out = []
    for i, path in items:
        with open(path, "rb") as f:
            out.append(_decode_one(i, f.read()))
    return out


def _decode_one(i: int, data: bytes | np.ndarray) -> tuple[int, str | None, tuple]:
    why = decode_error(data)
    return i, why, (image_size(data) if why is None else ())


def _decode_all(
    func, chunks: list, total: int, workers: int
) -> list[tuple[int, str | None, tuple]]:
    """Decode in ``workers`` processes (in this one when ``workers`` <= 1)."""
    results = []
    with (
        mapper(workers) as pmap,
        tqdm(total=total, desc="decode", unit="img", file=sys.stderr) as bar,
    ):
        for part in pmap(func, chunks):
            results.extend(part)
            bar.update(len(part))
    return results


def _pick(n: int, full: bool, sample: int, seed: int) -> np.ndarray:
    if full or sample >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))


def check_rec(
    path: str, *, full: bool, sample: int, num_classes: int | None, workers: int, seed: int
):
    """(summary fields, problems, warnings) of a ``.rec``."""
    prefix = split_prefix(path)
    rec, _ = require_files(prefix)
    with tempfile.TemporaryDirectory(prefix="data_pipelines-check-") as tmp:
        table = str(Path(tmp) / "table")
        build_table(prefix, table, full=full, progress=True)
        scan = open_table(table, rec, property_classes(prefix))
        assert scan is not None
        problems = list(scan.problems)
        classes = num_classes or scan.declared_classes
        if classes is not None:
            problems += check_label_range(scan.labels, scan.keys, scan.offsets, classes)
        n = scan.num_images
        if full or sample >= n:
            chunks = [
                (rec, table, np.arange(lo, min(lo + _FULL_CHUNK, n)))
                for lo in range(0, n, _FULL_CHUNK)
            ]
        else:
            picked = _pick(n, full, sample, seed)
            chunks = [(rec, table, picked[j : j + _CHUNK]) for j in range(0, picked.size, _CHUNK)]
        decoded, failures, odd, first_odd = 0, [], 0, None
        with (
            mapper(workers) as pmap,
            tqdm(
                total=sum(c[2].size for c in chunks), desc="decode", unit="img", file=sys.stderr
            ) as bar,
        ):
            for count, failed, odd_count, first in pmap(_decode_rec_chunk, chunks):
                decoded += count
                failures += failed
                odd += odd_count
                first_odd = first_odd or first
                bar.update(count)
        for i, kind, why in sorted(failures):
            problems.append(Problem(kind, int(scan.keys[i]), int(scan.offsets[i]), why))
        warnings = []
        header = scan.header_range
        if header is not None and np.float32(header[1]) != np.float32(scan.num_records):
            warnings.append(
                f"header promises {header[1]} records; the index lists {scan.num_records}"
            )
        if odd:
            warnings.append(
                f"{odd} decoded images are not 112x112 (e.g. {first_odd}); set data.resize: true"
            )
        return _fields(scan.labels, classes, decoded), problems, warnings


def check_folder(
    path: str, *, full: bool, sample: int, num_classes: int | None, workers: int, seed: int
):
    """(summary fields, problems, warnings) of a folder of identity folders."""
    scan = scan_folder(path)
    classes = num_classes or len(scan.class_names)
    problems = check_label_range(scan.labels, scan.files, None, classes)
    counts = np.bincount(scan.labels, minlength=len(scan.class_names))
    warnings = [
        f"identity folder {scan.class_names[c]!r} holds no images"
        for c in np.flatnonzero(counts == 0)
    ]
    picked = _pick(scan.num_images, full, sample, seed)
    items = [(int(i), scan.path(int(i))) for i in picked]
    chunks = [items[j : j + _CHUNK] for j in range(0, len(items), _CHUNK)]
    odd = []
    for i, why, size in _decode_all(_decode_file_chunk, chunks, len(items), workers):
        if why is not None:
            problems.append(Problem("decode", scan.files[i], None, why))
        elif size != (IMAGE_SIZE, IMAGE_SIZE):
            odd.append(f"{scan.files[i]} is {size[0]}x{size[1]}")
    warnings += _size_warning(odd)
    return _fields(scan.labels, classes, len(items)), problems, warnings


def _size_warning(odd: list[str]) -> list[str]:
    if not odd:
        return []
    return [f"{len(odd)} decoded images are not 112x112 (e.g. {odd[0]}); set data.resize: true"]


def _fields(labels: np.ndarray, classes: int | None, decoded: int) -> dict[str, object]:
    return {
        "images": int(labels.size),
        "classes": classes if classes is not None else int(np.unique(labels).size),
        "min_label": int(labels.min()) if labels.size else None,
        "max_label": int(labels.max()) if labels.size else None,
        "decoded": decoded,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipelines.check", description=__doc__.splitlines()[0]
    )
    ap.add_argument("path", help=".rec prefix (train, train.rec) or a folder of identity folders")
    ap.add_argument("--full", action="store_true", help="decode every image, not a sample")
    ap.add_argument("--sample", type=int, default=1000, help="images to decode without --full")
    ap.add_argument(
        "--num-classes", type=int, default=None, help="override the declared class count"
    )
    ap.add_argument(
        "--all", action="store_true", help=f"list every problem, not the first {_SHOWN}"
    )
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    is_rec = os.path.isfile(split_prefix(a.path) + ".rec")
    if not is_rec and not os.path.isdir(a.path):
        print(f"error: {a.path} is neither PREFIX(.rec) nor a directory", file=sys.stderr)
        return 2
    kw = {
        "full": a.full,
        "sample": a.sample,
        "num_classes": a.num_classes,
        "workers": a.workers,
        "seed": a.seed,
    }
    try:
        fields, problems, warnings = (check_rec if is_rec else check_folder)(a.path, **kw)
    except (OSError, ValueError) as exc:  # a missing .idx, a malformed .idx or property
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={v}" for k, v in fields.items()) + f" problems={len(problems)}")
    for w in warnings:
        print(f"WARNING {w}")
    shown = problems if a.all else problems[:_SHOWN]
    for p in shown:
        print(f"ERROR {p}")
    if len(problems) > len(shown):
        print(f"... and {len(problems) - len(shown)} more; --all lists every one")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
