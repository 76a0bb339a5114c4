"""Augmentation as DALI ops, applied with the parameters drawn in ``params.py``.

The parameters are drawn in NumPy per sample position (see ``params.py`` for why). The ops follow
insightface's ``dali_aug`` (downscale-upscale, Gaussian blur, hue/saturation, grayscale), but run
under DALI conditionals, so only the chosen samples pay for a branch.
"""

from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode

IMAGE_SIZE = 112  # insightface's aligned face crops


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
