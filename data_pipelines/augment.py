"""Augmentation: parameters drawn in NumPy, applied by DALI ops.

Drawing every random choice in Python, keyed on (seed, epoch, sample position), makes a batch a
pure function of its position: a resumed run sees the same flips and blurs as the original,
which DALI's own per-pipeline RNG (advanced by prefetching) cannot promise. The ops follow
insightface's ``dali_aug`` (downscale-upscale, Gaussian blur, hue/saturation, grayscale), but run
under DALI conditionals, so only the chosen samples pay for a branch.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode

IMAGE_SIZE = 112  # insightface's aligned face crops
PARAM_NAMES = ("mirror", "downscale", "size", "blur", "hsv", "hue", "saturation", "gray")
_USES = {
    "downscale": ("downscale", "size"),
    "blur": ("blur",),
    "hsv": ("hsv", "hue", "saturation"),
    "gray": ("gray",),
}


def active_params(probs: dict[str, float]) -> tuple[str, ...]:
    """Parameters the graph reads: DALI warns about (and pays for) unused inputs."""
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


def augment(
    images: DataNode,
    params: dict[str, DataNode],
    probs: dict[str, float],
    *,
    resize: bool,
    fp16: bool,
    size: int = IMAGE_SIZE,
) -> DataNode:
    """Decoded HWC uint8 images -> normalised (size, size) CHW float (fp16 on GPU), mean = std =
    127.5. Without ``resize`` a 112 px image is centre-cropped to ``size`` == 112.

    Must be traced inside a pipeline built with ``enable_conditionals=True``.
    """
    if resize or size != IMAGE_SIZE:
        images = fn.resize(images, size=(size, size))
    # `probs[...] > 0` is decided at build time: a disabled augmentation adds no op at all.
    if probs["downscale"] > 0 and params["downscale"]:
        side = params["size"] * size
        small = fn.resize(images, resize_x=side, resize_y=side)
        images = fn.resize(small, size=(size, size))
    if probs["blur"] > 0 and params["blur"]:
        images = fn.gaussian_blur(images, window_size=3)
    if probs["hsv"] > 0 and params["hsv"]:
        images = fn.hsv(images, hue=params["hue"], saturation=params["saturation"])
    if probs["gray"] > 0 and params["gray"]:
        images = fn.hsv(images, saturation=0.0)
    return fn.crop_mirror_normalize(
        images,
        crop=(size, size),
        mirror=params["mirror"],
        mean=[127.5] * 3,
        std=[127.5] * 3,
        output_layout="CHW",
        dtype=types.FLOAT16 if fp16 else types.FLOAT,
    )
