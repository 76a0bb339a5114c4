"""Augmentation parameters: every random choice drawn in NumPy, keyed on the sample position.

Drawing every choice in Python, keyed on (seed, epoch, sample position), makes a batch a pure
function of its position: a resumed run sees the same flips and blurs as the original, which
DALI's own per-pipeline RNG (advanced by prefetching) cannot promise. The draws are shared by
both decoders (DALI's graph in ``augment.py``, torch ops in ``torch_augment.py``), so they live
here, free of DALI: the ``nvimgcodec`` decoder must run where DALI is not installed.
"""

from __future__ import annotations

import numpy as np

PARAM_NAMES = ("mirror", "downscale", "size", "blur", "hsv", "hue", "saturation", "gray")
_USES = {
    "downscale": ("downscale", "size"),
    "blur": ("blur",),
    "hsv": ("hsv", "hue", "saturation"),
    "gray": ("gray",),
}


def active_params(probs: dict[str, float]) -> tuple[str, ...]:
    """Parameters the augmentation reads: DALI warns about (and pays for) unused inputs."""
    used = {"mirror"} | {n for aug, names in _USES.items() if probs[aug] > 0 for n in names}
    return tuple(n for n in PARAM_NAMES if n in used)


def draw_params(
    key: list[int], batch_size: int, probs: dict[str, float], mirror: float
) -> list[np.ndarray]:
    """One (B,) array per name in ``active_params(probs)``. All are drawn, so turning one
    augmentation on or off leaves the others' draws unchanged."""
    rng = np.random.default_rng(key)
    n = batch_size
    cols = {
        "mirror": (rng.random(n) < mirror).astype(np.int32),
        "downscale": rng.random(n) < probs["downscale"],
        "size": rng.uniform(0.5, 0.8, n).astype(np.float32),  # fraction of the side
        "blur": rng.random(n) < probs["blur"],
        "hsv": rng.random(n) < probs["hsv"],
        "hue": rng.uniform(0.0, 20.0, n).astype(np.float32),
        "saturation": rng.uniform(1.0, 1.2, n).astype(np.float32),
        "gray": rng.random(n) < probs["gray"],
    }
    return [cols[name] for name in active_params(probs)]
