"""insightface verification ``.bin`` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...), no mxnet.

A ``.bin`` is a pickle of ``(images, issame)``: ``2P`` encoded JPEG/PNG byte strings (pair ``i``
is images ``2i`` and ``2i + 1``) and ``P`` booleans. insightface wrote them with Python 2, whose
``str`` is a byte string; we unpickle with ``encoding="latin1"`` and turn such strings back into
the exact original bytes (``"bytes"``, insightface's own choice, would break on numpy arrays in a
Python 2 pickle; latin1 handles both). Items may be ``bytes``, ``bytearray``, ``numpy.bytes_`` or
uint8 arrays. A pickle can run code when loaded, so only the few globals these files need
(bytearray, numpy arrays/scalars, ``_codecs.encode``) are allowed; anything else is refused.

Images decode with Pillow to RGB uint8 ``(H, W, 3)``; an image of another size than the model's
is resized (bilinear) to ``image_size x image_size``, where insightface's ``resize_short`` keeps
the aspect ratio (the same thing for the square images these sets hold).
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.faces import heldout_pairs
from data_pipelines.insightface import write_bin

_ALLOWED = {
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("__builtin__", "bytearray"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
}


class BinError(ValueError):
    """A ``.bin`` that cannot be read; the message names the file."""


@dataclass(frozen=True)
class BinSet:
    """A decoded verification set: ``images`` (2P, S, S, 3) uint8 RGB, ``issame`` (P,) bool."""

    name: str
    images: np.ndarray
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        module = module.replace("numpy.core.", "numpy._core.").replace("__builtin__", "builtins")
        return super().find_class(module, name)


def _as_bytes(item: object) -> bytes | None:
    if isinstance(item, str):  # a Python 2 byte string, decoded as latin1
        return item.encode("latin1")
    if isinstance(item, (bytes, bytearray, memoryview)):  # numpy.bytes_ is a bytes subclass
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    return None


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """The encoded images and the ``issame`` flags of a ``.bin``, checked but not decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such verification .bin file")
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # a truncated or foreign file raises any of many types
        raise BinError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinError(
            f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}"
        )
    raw_images, raw_issame = obj
    if not isinstance(raw_images, (list, tuple, np.ndarray)):
        raise BinError(f"{path}: images are a {type(raw_images).__name__}, not a list")
    try:
        issame = np.asarray(raw_issame)
    except Exception as exc:
        raise BinError(f"{path}: issame is not a list of booleans ({exc})") from exc
    if issame.size == 0:
        raise BinError(f"{path}: holds no pairs")
    if issame.ndim != 1 or not (
        issame.dtype == bool or (issame.dtype.kind in "iu" and np.isin(issame, (0, 1)).all())
    ):
        raise BinError(f"{path}: issame is not a flat list of booleans ({issame.dtype})")
    images: list[bytes] = []
    for i, item in enumerate(raw_images):
        data = _as_bytes(item)
        if data is None:
            raise BinError(f"{path}: image {i} is a {type(item).__name__}, not encoded bytes")
        images.append(data)
    if len(images) != 2 * issame.size:
        raise BinError(
            f"{path}: {len(images)} images for {issame.size} pairs (expected {2 * issame.size})"
        )
    return images, issame.astype(bool)


def decode_image(data: bytes, image_size: int | None = None) -> np.ndarray:
    """Decode to RGB uint8 ``(H, W, 3)``, resized to ``image_size`` square if given and needed."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if image_size is not None and im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def load_bin(path: str | os.PathLike, image_size: int = 112) -> BinSet:
    """Read and decode a ``.bin``; errors name the file and, for a bad image, its index."""
    images, issame = read_bin(path)
    out = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        try:
            out[i] = decode_image(data, image_size)
        except Exception as exc:
            raise BinError(
                f"{path}: image {i} does not decode ({type(exc).__name__}: {exc})"
            ) from exc
    return BinSet(Path(path).stem, out, issame)


def synthetic_bin(
    path: str | os.PathLike,
    num_pairs: int,
    first_identity: int,
    seed: int = 0,
    image_size: int = 112,
) -> Path:
    """Write a ``.bin`` of held-out synthetic faces (``data_pipelines.faces.heldout_pairs``:
    identities from ``first_identity`` on) and return its path."""
    images, issame, _ = heldout_pairs(
        num_pairs, seed=seed, first_identity=first_identity, image_size=image_size
    )
    return write_bin(path, images, issame)
