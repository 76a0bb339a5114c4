"""A clean verification ``.bin`` of synthetic identities that no training set holds.

Written next to a (noisy) synthetic ``.rec`` so that the label noise can hurt training only:
the test pairs show identities from ``HELDOUT_FIRST`` on (training identities are ``0..ids-1``,
``ids < HELDOUT_FIRST``), drawn by the same prototype and view generator. The file is
insightface's pickle ``(images, issame)`` that ``pfc_ds.eval.bins`` and the trainer's
``eval.sets`` read; it is written here, not through ``pfc_ds``, because ``pfc_ds`` imports
``data_pipelines`` and not the other way round.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from .jpeg import encode_jpeg
from .noise import HELDOUT_FIRST
from .synth import prototype, view


def heldout_pairs(
    num_pairs: int, *, seed: int = 0, first_identity: int = HELDOUT_FIRST
) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """``(jpegs, issame, identities)``: ``2P`` 112x112 JPEGs (pair ``i`` = images ``2i``,
    ``2i + 1``), ``issame`` alternating True/False (every contiguous fold holds both kinds) and
    the identity of each image, drawn from a pool of ``max(2, P)`` identities."""
    if num_pairs < 1:
        raise ValueError(f"--heldout-pairs must be >= 1, got {num_pairs}")
    pool = max(2, num_pairs)
    rng = np.random.default_rng([seed, first_identity, num_pairs, 3])
    issame = np.arange(num_pairs) % 2 == 0
    a = rng.integers(pool, size=num_pairs)
    b = np.where(issame, a, (a + 1 + rng.integers(pool - 1, size=num_pairs)) % pool)
    identities = first_identity + np.stack([a, b], 1).reshape(-1).astype(np.int64)
    faces: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    jpegs = []
    for identity in identities.tolist():
        if identity not in faces:
            faces[identity] = prototype(identity, seed)
        jpegs.append(encode_jpeg(view(faces[identity], rng), quality=90))
    return jpegs, issame, identities


def write_bin(path: str | os.PathLike, images: list[bytes], issame: np.ndarray) -> Path:
    """insightface's ``.bin``: a pickle of (encoded images, issame), written atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(([bytes(b) for b in images], [bool(x) for x in issame]), f, protocol=4)
    os.replace(tmp, path)
    return path
