"""The index table of a ``.rec``: flat column files that every rank maps read-only.

A 42M-record table is about 1 GB. Loaded into each rank's memory (the former ``.npz``) it
cost 1.7 GB per rank with nothing shared; as uncompressed columns mapped read-only, a node
holds one copy in its page cache and each rank's private memory is what it computes itself.

A table is a directory: one raw little-endian file per column and ``meta.json``, written
last. It is built under a temporary name and renamed into place (``publish``) after every
file is fsynced, so a build killed midway leaves only a temporary directory that nothing
opens. Columns are appended in fixed-size chunks (``TableWriter``), so building one never
holds a whole column in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import recordio

VERSION = 2
COLUMNS = {
    "keys": np.dtype("<i8"),
    "offsets": np.dtype("<i8"),
    "labels": np.dtype("<i4"),
    "image_start": np.dtype("<i8"),  # scanned tables only: -1 = a split record, read slowly
    "image_len": np.dtype("<i4"),  # scanned tables only (a RecordIO part is < 2^29 bytes)
}
SCANNED, INSIGHTFACE = "scanned", "insightface"  # how the table was built (``RecScan.layout``)
_META = "meta.json"


@dataclass(frozen=True)
class Problem:
    """One bad record. ``kind``: bad_magic, truncated, duplicate, bad_label, label_range,
    decode; for records first read in training also not_image and label_mismatch."""

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

    ``layout`` says how the table was made. ``scanned``: every record's header was read;
    ``image_start``/``image_len`` locate the JPEG bytes (``image_start`` -1 for the rare record
    split around an embedded magic number). ``insightface``: labels came from the identity
    records, no image record was read, ``image_start``/``image_len`` are None, and
    ``image_bytes`` checks each record's header (framing, label) when it is read.
    """

    rec_path: str
    keys: np.ndarray
    offsets: np.ndarray
    image_start: np.ndarray | None
    image_len: np.ndarray | None
    labels: np.ndarray
    problems: list[Problem] = field(default_factory=list)
    header_range: tuple[int, int] | None = None
    declared_classes: int | None = None
    num_records: int = 0
    layout: str = SCANNED
    table_dir: str | None = None  # the mapped table's directory (None: held in memory)
    records_read: int | None = None  # record headers read to build it

    @property
    def num_images(self) -> int:
        return int(self.keys.size)

    def image_bytes(self, buf: bytes | memoryview | np.ndarray, i: int) -> bytes | memoryview:
        """JPEG bytes of image ``i`` from a buffer over the whole ``.rec`` (mmap).

        Raises ``recordio.BadRecord`` when an ``insightface`` table's record turns out bad.
        """
        if self.image_start is None:
            label, image = recordio.image_record(buf, int(self.offsets[i]))
            if label != float(self.labels[i]):
                raise recordio.BadRecord(
                    "label_mismatch",
                    f"the record's label is {label:g} but its identity record gives "
                    f"{int(self.labels[i])}",
                )
            return image
        start = int(self.image_start[i])
        if start >= 0:
            return memoryview(buf)[start : start + int(self.image_len[i])]
        payload, _ = recordio.read_at(buf, int(self.offsets[i]))
        return recordio.unpack_payload(payload)[2]

    def in_memory(self) -> RecScan:
        """A copy whose columns are private arrays (int64 labels), independent of any file."""
        copy = {
            name: None if getattr(self, name) is None else np.array(getattr(self, name))
            for name in COLUMNS
        }
        copy["labels"] = copy["labels"].astype(np.int64)
        return RecScan(
            rec_path=self.rec_path,
            **copy,
            problems=list(self.problems),
            header_range=self.header_range,
            declared_classes=self.declared_classes,
            num_records=self.num_records,
            layout=self.layout,
            records_read=self.records_read,
        )


class TableWriter:
    """Append columns chunk by chunk to a new directory; ``finish`` makes it a whole table."""

    def __init__(self, directory: str | os.PathLike, columns: tuple[str, ...]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True)
        self._files = {name: open(self.dir / f"{name}.bin", "wb") for name in columns}  # noqa: SIM115
        self.length = dict.fromkeys(columns, 0)

    def append(self, name: str, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=COLUMNS[name])
        values.tofile(self._files[name])
        self.length[name] += values.size

    def reset(self) -> None:
        """Empty every column (a scan that must start over in another order)."""
        for name, f in self._files.items():
            f.seek(0)
            f.truncate()
            self.length[name] = 0

    def column(self, name: str) -> np.ndarray:
        """What has been written to ``name`` so far, mapped read-only."""
        self._files[name].flush()
        return _map(self.dir / f"{name}.bin", COLUMNS[name], self.length[name])

    def finish(self, meta: dict) -> None:
        """fsync every column, then write ``meta.json`` (the table's last file) and fsync it."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        columns = {n: {"dtype": COLUMNS[n].str, "length": k} for n, k in self.length.items()}
        body = json.dumps({"version": VERSION, "columns": columns, **meta})
        with open(self.dir / _META, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.dir)

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def meta_of(
    problems: list[Problem],
    header_range: tuple[int, int] | None,
    declared_classes: int | None,
    num_records: int,
    layout: str,
    records_read: int,
) -> dict:
    return {
        "problems": [asdict(p) for p in problems],
        "header_range": list(header_range) if header_range is not None else None,
        "declared_classes": declared_classes,
        "num_records": num_records,
        "layout": layout,
        "records_read": records_read,
    }


def publish(tmp: Path, final: Path) -> bool:
    """Rename the finished ``tmp`` to ``final`` atomically; False (and ``tmp`` removed) if a
    table is there already."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    _fsync_dir(final.parent)
    return True


def open_table(
    directory: str | os.PathLike, rec_path: str, declared_classes: int | None = None
) -> RecScan | None:
    """Map the table in ``directory`` read-only; None unless it is whole and of this version.

    ``declared_classes`` (the ``property`` file's count, read fresh) overrides the stored one.
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / _META).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != VERSION:
        return None
    cols: dict[str, np.ndarray | None] = dict.fromkeys(COLUMNS)
    for name, spec in meta["columns"].items():
        path, dtype = directory / f"{name}.bin", np.dtype(spec["dtype"])
        if dtype != COLUMNS[name] or not path.is_file():
            return None
        if path.stat().st_size != spec["length"] * dtype.itemsize:
            return None
        cols[name] = _map(path, dtype, spec["length"])
    if cols["keys"] is None or cols["offsets"] is None or cols["labels"] is None:
        return None
    header = meta["header_range"]
    return RecScan(
        rec_path=rec_path,
        keys=cols["keys"],
        offsets=cols["offsets"],
        image_start=cols["image_start"],
        image_len=cols["image_len"],
        labels=cols["labels"],
        problems=[Problem(**p) for p in meta["problems"]],
        header_range=tuple(header) if header else None,
        declared_classes=declared_classes or meta["declared_classes"],
        num_records=meta["num_records"],
        layout=meta["layout"],
        table_dir=str(directory),
        records_read=meta["records_read"],
    )


def _map(path: Path, dtype: np.dtype, length: int) -> np.ndarray:
    if length == 0:  # mmap refuses an empty file
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
