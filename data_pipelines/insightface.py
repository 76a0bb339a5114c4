"""insightface's dataset layout on top of RecordIO: header record, images, identity records.

Shipped files (MS1MV3, Glint360K, WebFace42M) are: record 0 = header (flag 2, labels
``(N + 1, N + 1 + C)``), records 1..N = images (flag 0, float label), records N+1..N+C = one per
identity (flag 2, labels = that identity's key range, no image), and a ``property`` text file
``C,112,112`` next to ``train.rec``. We write the same so every insightface tool reads our files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from .recordio import RecordWriter, pack_payload

IMAGE_SIZE = 112


def split_prefix(path: str | os.PathLike) -> str:
    """Accept ``x``, ``x.rec`` or ``x.idx`` and return the prefix ``x``."""
    path = os.fspath(path)
    for ext in (".rec", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def property_path(prefix: str) -> Path:
    return Path(prefix).parent / "property"


def read_property(prefix: str) -> int | None:
    """Class count from insightface's ``property`` file (``C,112,112``), if present."""
    path = property_path(prefix)
    if not path.is_file():
        return None
    first = path.read_text().strip().split(",")[0]
    try:
        return int(first)
    except ValueError as exc:
        raise ValueError(f"{path}: expected 'num_classes,112,112', got {first!r}") from exc


def write_dataset(
    prefix: str | os.PathLike,
    items: Iterable[tuple[int, bytes]],
    *,
    num_images: int,
    num_classes: int,
    identity_ranges: list[tuple[int, int]] | None = None,
    progress: bool = False,
) -> None:
    """Write header, ``num_images`` image records from ``items`` (label, jpeg), identity records.

    ``identity_ranges[c]`` is identity c's ``[first key, end key)`` when images are grouped by
    identity (insightface's own files). When images are shuffled, ranges do not exist; identity
    records then hold ``(c, count)`` and consumers must rely on the header only -- as
    arcface_torch and this package do.
    """
    prefix = split_prefix(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    counts = [0] * num_classes
    first_id = num_images + 1
    with RecordWriter(prefix) as w:
        w.write(0, pack_payload((float(first_id), float(first_id + num_classes)), b""))
        written = 0
        for key, (label, jpeg) in enumerate(
            tqdm(items, total=num_images, desc="write", disable=not progress, unit="img"), 1
        ):
            if not 0 <= label < num_classes:
                raise ValueError(f"label {label} of image {key} is outside [0, {num_classes})")
            w.write(key, pack_payload(float(label), jpeg))
            counts[label] += 1
            written += 1
        if written != num_images:
            raise ValueError(f"expected {num_images} images, got {written}")
        for c in range(num_classes):
            rng = identity_ranges[c] if identity_ranges is not None else (c, counts[c])
            w.write(first_id + c, pack_payload((float(rng[0]), float(rng[1])), b""))
    property_path(prefix).write_text(f"{num_classes},{IMAGE_SIZE},{IMAGE_SIZE}\n")
