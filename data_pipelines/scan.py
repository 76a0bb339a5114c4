"""Scan a ``.rec``/``.idx`` pair into a table of image records, finding every framing problem.

We read only the 36 leading bytes of each record, vectorised over an ``np.memmap``, so a 42M
record file is validated at disk speed with no per-record Python. Header and identity records
(no image bytes) are dropped here: DALI's decoder fails on them (insightface #2235) and they are
not samples. Results are cached by (path, size, mtime) because the scan reads the whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import recordio
from .insightface import read_property, split_prefix

_HEAD = np.dtype(
    [
        ("magic", "<u4"),
        ("lrec", "<u4"),
        ("flag", "<u4"),
        ("label", "<f4"),
        ("id", "<u8"),
        ("id2", "<u8"),
        ("label0", "<f4"),  # first of ``flag`` labels when flag > 0
    ]
)
_CHUNK = 1 << 18  # records per vectorised step: 36 x 8 B x 256k = 75 MB of indices
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Problem:
    """One bad record. ``kind``: bad_magic, truncated, duplicate, bad_label, label_range, decode."""

    kind: str
    key: int | str
    offset: int | None
    detail: str

    def __str__(self) -> str:
        where = f"key={self.key}" + (f" offset={self.offset}" if self.offset is not None else "")
        return f"{self.kind}: {where}: {self.detail}"


@dataclass
class RecScan:
    """Image records of one ``.rec`` in file order, plus what was wrong with the others.

    ``image_start``/``image_len`` locate the JPEG bytes directly in the file; ``image_start`` is
    -1 for the rare record split around an embedded magic number (read it with ``read_at``).
    """

    rec_path: str
    keys: np.ndarray
    offsets: np.ndarray
    image_start: np.ndarray
    image_len: np.ndarray
    labels: np.ndarray
    problems: list[Problem] = field(default_factory=list)
    header_range: tuple[int, int] | None = None
    declared_classes: int | None = None
    num_records: int = 0

    @property
    def num_images(self) -> int:
        return int(self.keys.size)

    def image_bytes(self, buf: bytes | memoryview | np.ndarray, i: int) -> bytes | memoryview:
        """JPEG bytes of image ``i`` from a buffer over the whole ``.rec`` (mmap)."""
        start = int(self.image_start[i])
        if start >= 0:
            return memoryview(buf)[start : start + int(self.image_len[i])]
        payload, _ = recordio.read_at(buf, int(self.offsets[i]))
        return recordio.unpack_payload(payload)[2]


def _gather_heads(mm: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """36 bytes at each offset (zero-filled past EOF) viewed as ``_HEAD`` records."""
    width = _HEAD.itemsize
    size = mm.shape[0]
    pos = offsets[:, None] + np.arange(width, dtype=np.int64)
    inside = (pos >= 0) & (pos < size)
    raw = np.zeros(pos.shape, dtype=np.uint8)
    raw[inside] = mm[pos[inside]]
    return raw.view(_HEAD).reshape(-1)


def _slow_record(buf: np.ndarray, offset: int) -> tuple[int, float, int]:
    """(flag, label, image length) of a multi-part record via the full reader."""
    payload, _ = recordio.read_at(buf, offset)
    header, labels, image = recordio.unpack_payload(payload)
    return header.flag, labels[0], len(image)


def scan_rec(prefix: str | os.PathLike, *, progress: bool = False) -> RecScan:
    """Validate framing and labels of every record listed in ``PREFIX.idx``."""
    prefix = split_prefix(prefix)
    rec_path, idx_path = _require(prefix)
    all_keys, all_offsets = recordio.read_index(idx_path)
    order = np.argsort(all_offsets, kind="stable")
    all_keys, all_offsets = all_keys[order], all_offsets[order]
    duplicate = np.r_[False, np.diff(all_offsets) == 0]  # DALI would size these 0 and drop them
    size = os.path.getsize(rec_path)
    mm = np.memmap(rec_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    problems: list[Problem] = []
    keep_parts: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    labels_out: list[np.ndarray] = []
    header_range = None
    bar = tqdm(total=all_keys.size, desc="scan", unit="rec", disable=not progress)
    for lo in range(0, all_keys.size, _CHUNK):
        keys, offs = all_keys[lo : lo + _CHUNK], all_offsets[lo : lo + _CHUNK]
        h = _gather_heads(mm, offs)
        cflag = (h["lrec"] >> 29).astype(np.int64)
        length = (h["lrec"] & recordio.MAX_PART).astype(np.int64)
        flag = h["flag"].astype(np.int64)
        label = np.where(flag > 0, h["label0"], h["label"]).astype(np.float64)
        bad = np.zeros(keys.size, dtype=bool)
        at = (problems, bad, keys, offs)
        _mark(*at, duplicate[lo : lo + _CHUNK], "duplicate", "offset listed twice in the index")
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
        if lo == 0 and keys.size and not bad[0] and image_len[0] == 0 and flag[0] >= 2:
            header_range = tuple(int(x) for x in _header_labels(mm, int(offs[0])))
        integral = np.isfinite(label) & (label == np.floor(label)) & (label >= 0)
        for i in np.flatnonzero(is_image & ~integral):
            detail = f"label {float(label[i])!r} is not an integer >= 0"
            problems.append(Problem("bad_label", int(keys[i]), int(offs[i]), detail))
        is_image &= integral
        keep_parts.append(np.stack([keys[is_image], offs[is_image]]))
        starts.append(image_start[is_image])
        lens.append(image_len[is_image])
        labels_out.append(label[is_image].astype(np.int64))
        bar.update(keys.size)
    bar.close()
    kept = np.concatenate(keep_parts, axis=1) if keep_parts else np.zeros((2, 0), np.int64)
    declared = _property_classes(prefix)
    if declared is None and header_range is not None:
        declared = header_range[1] - header_range[0]
    return RecScan(
        rec_path=rec_path,
        keys=kept[0],
        offsets=kept[1],
        image_start=np.concatenate(starts) if starts else np.zeros(0, np.int64),
        image_len=np.concatenate(lens) if lens else np.zeros(0, np.int64),
        labels=np.concatenate(labels_out) if labels_out else np.zeros(0, np.int64),
        problems=problems,
        header_range=header_range,
        declared_classes=declared,
        num_records=int(all_keys.size),
    )


def _property_classes(prefix: str) -> int | None:
    prop = read_property(prefix)
    return prop.num_classes if prop is not None else None


def _require(prefix: str) -> tuple[str, str]:
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


def _header_labels(mm: np.ndarray, offset: int) -> tuple[float, ...]:
    payload, _ = recordio.read_at(mm, offset)
    return recordio.unpack_payload(payload)[1][:2]


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


def _cache_file(cache_dir: str, rec_path: str) -> Path:
    st = os.stat(rec_path)
    idx_st = os.stat(split_prefix(rec_path) + ".idx")
    ident = f"{_CACHE_VERSION}|{os.path.abspath(rec_path)}|{st.st_size}|{st.st_mtime_ns}|{idx_st.st_mtime_ns}"
    digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(rec_path).stem}-{digest}.npz"


def load_or_scan(
    prefix: str | os.PathLike, cache_dir: str | None, *, progress: bool = False
) -> RecScan:
    """``scan_rec`` through a cache keyed on the files' size and mtime (the scan reads it all)."""
    prefix = split_prefix(prefix)
    _require(prefix)
    if cache_dir is None:
        return scan_rec(prefix, progress=progress)
    path = _cache_file(cache_dir, prefix + ".rec")
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return RecScan(
                rec_path=prefix + ".rec",
                keys=z["keys"], offsets=z["offsets"], image_start=z["image_start"],
                image_len=z["image_len"], labels=z["labels"],
                problems=[Problem(**p) for p in meta["problems"]],
                header_range=tuple(meta["header_range"]) if meta["header_range"] else None,
                declared_classes=_property_classes(prefix) or meta["declared_classes"],
                num_records=meta["num_records"],
            )  # fmt: skip
    scan = scan_rec(prefix, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "problems": [asdict(p) for p in scan.problems],
        "header_range": scan.header_range,
        "declared_classes": scan.declared_classes,
        "num_records": scan.num_records,
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, keys=scan.keys, offsets=scan.offsets, image_start=scan.image_start,
             image_len=scan.image_len, labels=scan.labels, meta=json.dumps(meta))  # fmt: skip
    os.replace(tmp, path)  # atomic: concurrent ranks may race to write the same cache
    return scan
