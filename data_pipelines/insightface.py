"""insightface's dataset layout on top of RecordIO: header record, images, identity records.

Shipped files (MS1MV3, Glint360K, WebFace42M) are: record 0 = header (flag 2, labels
``(N + 1, N + 1 + C)``), records 1..N = images (flag 0, float label), records N+1..N+C = one per
identity (flag 2, labels = that identity's key range, no image), and a ``property`` text file
``C,112,112`` (classes, height, width) next to ``train.rec``. We write the same so every
insightface tool reads our files; when the images are not all one size we write ``C,mixed``
instead of claiming a size they do not have (insightface's own readers then refuse the file).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .recordio import RecordWriter, pack_payload

IMAGE_SIZE = 112
MIXED = "mixed"


def split_prefix(path: str | os.PathLike) -> str:
    """Accept ``x``, ``x.rec`` or ``x.idx`` and return the prefix ``x``."""
    path = os.fspath(path)
    for ext in (".rec", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def property_path(prefix: str) -> Path:
    return Path(prefix).parent / "property"


@dataclass(frozen=True)
class Property:
    """The ``property`` file: class count and the one image size, if the images share one."""

    num_classes: int
    image_size: tuple[int, int] | None = None  # (height, width); None: mixed or not recorded
    mixed: bool = False  # ``C,mixed``: the writer saw images of different sizes


def read_property(prefix: str) -> Property | None:
    """Parse ``property`` (``C,H,W``, ``C,mixed`` or ``C``) next to ``prefix``, if present."""
    path = property_path(prefix)
    if not path.is_file():
        return None
    text = path.read_text().strip()
    fields = [f.strip() for f in text.split(",")]
    try:
        num_classes = int(fields[0])
        if fields[1:] == [MIXED]:
            return Property(num_classes, None, mixed=True)
        if len(fields) == 3:
            return Property(num_classes, (int(fields[1]), int(fields[2])))
        if len(fields) == 1:
            return Property(num_classes)
    except ValueError:
        pass
    raise ValueError(
        f"{path}: expected 'num_classes,height,width' or 'num_classes,mixed', got {text!r}"
    )


def write_property(prefix: str, num_classes: int, image_size: tuple[int, int] | None) -> None:
    """Write ``C,H,W`` for one shared (height, width), or ``C,mixed`` for ``None``."""
    size = MIXED if image_size is None else f"{image_size[0]},{image_size[1]}"
    property_path(prefix).write_text(f"{num_classes},{size}\n")


def write_dataset(
    prefix: str | os.PathLike,
    items: Iterable[tuple[int, bytes]],
    *,
    num_images: int,
    num_classes: int,
    identity_ranges: list[tuple[int, int]] | None = None,
    image_size: tuple[int, int] | None = (IMAGE_SIZE, IMAGE_SIZE),
    progress: bool = False,
) -> None:
    """``write_records`` then a ``property`` recording ``image_size`` (None: mixed sizes)."""
    write_records(
        prefix,
        items,
        num_images=num_images,
        num_classes=num_classes,
        identity_ranges=identity_ranges,
        progress=progress,
    )
    write_property(split_prefix(prefix), num_classes, image_size)


def write_records(
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
    arcface_torch and this package do. Keys are record ordinals (0 = header), which is what
    ``python -m data_pipelines.index`` assigns when it rebuilds a lost ``.idx``.
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


def write_bin(
    path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool] | np.ndarray
) -> Path:
    """insightface's verification ``.bin``: a pickle of (encoded images, issame), written
    atomically (``pfc_ds.eval.bins`` reads it; the one writer of the format)."""
    issame = [bool(x) for x in issame]
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(([bytes(b) for b in images], issame), f, protocol=4)
    os.replace(tmp, path)
    return path
