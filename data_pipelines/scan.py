"""Scan every record of a ``.rec``/``.idx`` pair into a table, finding every framing problem.

We read only the 40 leading bytes of each record, vectorised over a memory map, so a 42M
record file is validated at disk speed with no per-record Python. Header and identity records
(no image bytes) are dropped here: DALI's decoder fails on them (insightface #2235) and they are
not samples. Memory stays bounded at any size: the ``.idx`` is streamed, the columns are
written to a ``TableWriter`` chunk by chunk, and the pages of the ``.rec`` a chunk touched are
dropped from the process's mapping before the next. Layouts without identity records need this
scan, and so does ``check --full``; insightface's own files start from their identity records
(``layout.py``) instead of reading every record.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import recordio
from .insightface import read_property, split_prefix
from .table import COLUMNS, SCANNED, Problem, RecScan, TableWriter, meta_of, open_table

__all__ = ["Problem", "RecScan", "check_label_range", "scan_into", "scan_rec"]

_CHUNK = 1 << 16  # records per vectorised step: 40 x 8 B x 64k = 21 MB of gather indices
_LABEL_END = 2.0**31  # labels are stored as int32


class _Unsorted(Exception):
    """The ``.idx`` does not list records in file order: sort it in memory instead."""


def scan_rec(prefix: str | os.PathLike, *, progress: bool = False) -> RecScan:
    """Validate framing and labels of every record listed in ``PREFIX.idx``; in memory.

    For small files and tools that want plain arrays; a data set for training goes through
    ``cache.open_index``, which maps a shared table instead.
    """
    prefix = split_prefix(prefix)
    require_files(prefix)
    with tempfile.TemporaryDirectory(prefix="data_pipelines-scan-") as tmp:
        out = TableWriter(Path(tmp) / "table", tuple(COLUMNS))
        out.finish(scan_into(prefix, out, progress=progress))
        table = open_table(out.dir, prefix + ".rec", property_classes(prefix))
        assert table is not None
        return table.in_memory()


def scan_into(prefix: str, out: TableWriter, *, progress: bool = False) -> dict:
    """Scan every record into ``out``'s columns; return the table's metadata."""
    rec_path, idx_path = require_files(prefix)
    with recordio.FileMap(rec_path) as rm:
        try:
            return _scan(prefix, rm, _file_order(idx_path), out, progress)
        except _Unsorted:
            out.reset()  # rare: an .idx not in file order is sorted in memory (~1.4 GB at 42M)
        keys, offsets = recordio.read_index(idx_path)
        order = np.argsort(offsets, kind="stable")
        keys, offsets = keys[order], offsets[order]
        del order
        chunks = (
            (keys[lo : lo + _CHUNK], offsets[lo : lo + _CHUNK])
            for lo in range(0, keys.size, _CHUNK)
        )
        return _scan(prefix, rm, chunks, out, progress)


def _file_order(idx_path: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The ``.idx`` in chunks of ``_CHUNK`` records; raises ``_Unsorted`` if offsets fall."""
    last = None
    for keys, offsets in recordio.iter_index(idx_path):
        if offsets.size == 0:
            continue
        if (last is not None and offsets[0] < last) or bool((np.diff(offsets) < 0).any()):
            raise _Unsorted
        last = offsets[-1]
        for lo in range(0, keys.size, _CHUNK):
            yield keys[lo : lo + _CHUNK], offsets[lo : lo + _CHUNK]


def _scan(
    prefix: str,
    rm: recordio.FileMap,
    chunks: Iterator[tuple[np.ndarray, np.ndarray]],
    out: TableWriter,
    progress: bool,
) -> dict:
    mm, size = rm.array, rm.size
    problems: list[Problem] = []
    header_range = None
    count = 0
    previous = None  # the last offset of the chunk before: a repeat is a duplicate
    bar = tqdm(desc="scan", unit="rec", disable=not progress)
    for keys, offs in chunks:
        first = previous is None
        duplicate = np.r_[offs[0] == previous, np.diff(offs) == 0]  # DALI would size these 0
        previous = offs[-1]
        h = recordio.gather_heads(mm, offs)
        cflag = (h["lrec"] >> 29).astype(np.int64)
        length = (h["lrec"] & recordio.MAX_PART).astype(np.int64)
        flag = h["flag"].astype(np.int64)
        label = np.where(flag > 0, h["label0"], h["label"]).astype(np.float64)
        bad = np.zeros(keys.size, dtype=bool)
        at = (problems, bad, keys, offs)
        _mark(*at, duplicate, "duplicate", "offset listed twice in the index")
        _mark(
            *at,
            (offs < 0) | (offs + 8 > size),
            "truncated",
            "record header lies past the end of the file",
        )
        _mark(*at, h["magic"] != recordio.MAGIC, "bad_magic", "magic is not 0xced7230a")
        _mark(*at, offs + 8 + length > size, "truncated", "record extends past the end of the file")
        _mark(*at, cflag > 1, "bad_magic", "index points into the middle of a split record")
        image_len = length - recordio.IR_SIZE - 4 * flag
        image_start = offs + 8 + recordio.IR_SIZE + 4 * flag
        for i in np.flatnonzero((cflag == 1) & ~bad):  # split around an embedded magic
            try:
                flag[i], label[i], image_len[i] = _slow_record(mm, int(offs[i]))
                image_start[i] = -1
            except recordio.RecordError as exc:
                _mark(*at, np.arange(keys.size) == i, "truncated", str(exc))
        _mark(*at, length < recordio.IR_SIZE, "truncated", "payload shorter than the IRHeader")
        _mark(*at, image_len < 0, "truncated", "fewer label floats than the IRHeader flag promises")
        is_image = (image_len > 0) & ~bad
        if first and keys.size and not bad[0] and image_len[0] == 0 and flag[0] >= 2:
            header_range = (int(h["label0"][0]), int(h["label1"][0]))
        integral = np.isfinite(label) & (label == np.floor(label)) & (label >= 0)
        for i in np.flatnonzero(is_image & ~integral):
            detail = f"label {float(label[i])!r} is not an integer >= 0"
            problems.append(Problem("bad_label", int(keys[i]), int(offs[i]), detail))
        for i in np.flatnonzero(is_image & integral & (label >= _LABEL_END)):
            detail = f"label {float(label[i])!r} is not below 2^31"
            problems.append(Problem("bad_label", int(keys[i]), int(offs[i]), detail))
        is_image &= integral & (label < _LABEL_END)
        out.append("keys", keys[is_image])
        out.append("offsets", offs[is_image])
        out.append("image_start", image_start[is_image])
        out.append("image_len", image_len[is_image])
        out.append("labels", label[is_image])
        rm.release(int(offs[0]), int(offs[-1]) + recordio.HEAD.itemsize)
        count += keys.size
        bar.update(keys.size)
    bar.close()
    declared = property_classes(prefix)
    if declared is None and header_range is not None:
        declared = header_range[1] - header_range[0]
    return meta_of(problems, header_range, declared, count, SCANNED, records_read=count)


def _slow_record(buf: np.ndarray, offset: int) -> tuple[int, float, int]:
    """(flag, label, image length) of a multi-part record via the full reader."""
    payload, _ = recordio.read_at(buf, offset)
    header, labels, image = recordio.unpack_payload(payload)
    return header.flag, labels[0], len(image)


def property_classes(prefix: str) -> int | None:
    """The class count of the ``property`` file next to ``prefix``, if there is one."""
    prop = read_property(prefix)
    return prop.num_classes if prop is not None else None


def require_files(prefix: str) -> tuple[str, str]:
    """The ``.rec`` and ``.idx`` paths; a one-line ``FileNotFoundError`` if one is missing."""
    rec, idx = prefix + ".rec", prefix + ".idx"
    if not os.path.isfile(rec):
        raise FileNotFoundError(f"{rec} not found (expected PREFIX.rec and PREFIX.idx)")
    if not os.path.isfile(idx):
        raise FileNotFoundError(
            f"{idx} not found; rebuild it with `python -m data_pipelines.index {rec}`"
        )
    return rec, idx


def _mark(
    problems: list[Problem],
    bad: np.ndarray,
    keys: np.ndarray,
    offs: np.ndarray,
    mask: np.ndarray,
    kind: str,
    detail: str,
) -> None:
    """Record a problem for each newly bad record in ``mask`` (first problem wins)."""
    for i in np.flatnonzero(mask & ~bad):
        problems.append(Problem(kind, int(keys[i]), int(offs[i]), detail))
    bad |= mask


def check_label_range(
    labels: np.ndarray, keys: np.ndarray | list, offsets: np.ndarray | None, num_classes: int
) -> list[Problem]:
    """A ``label_range`` problem for each label >= ``num_classes`` (names key and offset)."""
    out = []
    for i in np.flatnonzero(labels >= num_classes):
        key = keys[i] if isinstance(keys, list) else int(keys[i])
        off = int(offsets[i]) if offsets is not None else None
        out.append(
            Problem("label_range", key, off, f"label {int(labels[i])} >= num_classes {num_classes}")
        )
    return out
