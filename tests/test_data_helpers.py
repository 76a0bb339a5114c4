"""Small data sets for the data_pipelines tests, with images that name themselves.

Image ``i`` is a flat colour whose red/green levels encode ``i``; a flat JPEG decodes to within
a couple of levels, so ``decode_ids`` recovers which sample DALI delivered from the pixels alone.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipelines.insightface import write_dataset
from data_pipelines.jpeg import decode_error, encode_jpeg
from data_pipelines.recordio import RecordWriter, pack_payload

_STEP, _BASE, _LEVELS = 4, 8, 60  # levels 8, 12, ..., 244


def image_jpeg(i: int) -> bytes:
    rgb = np.empty((112, 112, 3), np.uint8)
    rgb[..., 0] = _BASE + _STEP * (i % _LEVELS)
    rgb[..., 1] = _BASE + _STEP * (i // _LEVELS)
    rgb[..., 2] = 128
    return encode_jpeg(rgb, quality=95)


def decode_ids(images: torch.Tensor) -> np.ndarray:
    """Sample ids from a normalised (B, 3, 112, 112) batch."""
    levels = images.float().mean(dim=(2, 3)) * 127.5 + 127.5
    r = torch.round((levels[:, 0] - _BASE) / _STEP).long()
    g = torch.round((levels[:, 1] - _BASE) / _STEP).long()
    return (g * _LEVELS + r).cpu().numpy()


def make_insightface(
    prefix: str | Path, n: int, per_id: int, *, shuffle: bool = False
) -> np.ndarray:
    """insightface layout (header, images, identity records); image i has label i // per_id.

    Returns labels by sample id. Files are written in sample-id order unless ``shuffle``.
    """
    labels = np.arange(n) // per_id
    classes = int(labels.max()) + 1
    order = np.random.default_rng(1).permutation(n) if shuffle else np.arange(n)
    ranges = (
        None
        if shuffle
        else [(1 + c * per_id, 1 + min((c + 1) * per_id, n)) for c in range(classes)]
    )
    items = [(int(labels[i]), image_jpeg(int(i))) for i in order]
    write_dataset(str(prefix), items, num_images=n, num_classes=classes, identity_ranges=ranges)
    return labels


def make_im2rec(
    prefix: str | Path, n: int, per_id: int, *, vector_labels: bool = False
) -> np.ndarray:
    """im2rec layout: no header, keys 0..n-1 are all images; optional flag > 0 label vectors."""
    labels = np.arange(n) // per_id
    with RecordWriter(str(prefix)) as w:
        for i in range(n):
            lab = (float(labels[i]), 7.0) if vector_labels else float(labels[i])
            w.write(i, pack_payload(lab, image_jpeg(i)))
    return labels


def make_folder(root: str | Path, n: int, per_id: int) -> np.ndarray:
    """root/id_XXX/img_YYY.jpg; ids sort in label order."""
    root = Path(root)
    labels = np.arange(n) // per_id
    for i in range(n):
        d = root / f"id_{labels[i]:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:04d}.jpg").write_bytes(image_jpeg(i))
    return labels


def test_decode_ids_recovers_every_id() -> None:
    ids = [0, 1, 59, 60, 61, 500, 3599]
    images = []
    for i in ids:
        assert decode_error(image_jpeg(i)) is None
        rgb = np.asarray(Image.open(BytesIO(image_jpeg(i))).convert("RGB"), np.float32)
        images.append(torch.from_numpy((rgb.transpose(2, 0, 1) - 127.5) / 127.5))
    assert decode_ids(torch.stack(images)).tolist() == ids
