"""Decode checks and JPEG encoding with Pillow, for tools that run outside DALI."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


def decode_error(data: bytes | memoryview | np.ndarray) -> str | None:
    """None if the image decodes completely, else why not (Pillow refuses truncated data)."""
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
            if im.size[0] < 1 or im.size[1] < 1:
                return f"empty image {im.size}"
    except UnidentifiedImageError:
        return "not an image Pillow can identify"
    except Exception as exc:  # Pillow raises many types for bad data
        return f"{type(exc).__name__}: {exc}"
    return None


def image_size(data: bytes | memoryview | np.ndarray) -> tuple[int, int]:
    """(width, height) from the header only."""
    with Image.open(io.BytesIO(bytes(data))) as im:
        return im.size


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """Encode an HWC uint8 RGB array."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(
        out, format="JPEG", quality=quality
    )
    return out.getvalue()
