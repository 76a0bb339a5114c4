"""The DALI augmentation graph (``augment.py``) as torch ops on decoded images.

The ``nvimgcodec`` decoder hands over decoded HWC uint8 tensors (on the GPU there, on the CPU
here) and no DALI is installed where it matters, so the same steps run as torch ops on the
tensors' device: resize, insightface's ``dali_aug`` (downscale-upscale, 3x3 Gaussian blur,
hue/saturation, grayscale), then ``crop_mirror_normalize``. Each step follows what DALI 2.4 does,
measured against it on this machine, so a batch matches the DALI loader's to rounding:

- every DALI op here outputs uint8, so each step's result is rounded and clamped to 0..255;
- ``fn.resize`` (linear, antialiased): a triangle filter of radius max(scale, 1) input pixels,
  edge pixels replicated past the border (not renormalised, as torch's ``antialias`` does), and
  a fractional output size rounds the size and shrinks the input ROI about its centre to keep
  the scale (``subpixel_scale``). Done as two (out x in) weight matrices, one GEMM per axis;
- ``fn.gaussian_blur(window_size=3)``: sigma 0.8, borders mirrored without repeating the edge;
- ``fn.hsv``: the linear RGB -> YIQ -> (rotate IQ by hue, scale by saturation) -> RGB map, with
  the exact inverse of DALI's RGB -> YIQ matrix;
- ``crop_mirror_normalize``: centre crop anchored at round-half-up((in - out) / 2), then flip,
  then (x - 127.5) / 127.5.

Per-sample choices come from the host-side parameter arrays, so selecting the samples an
augmentation applies to needs no device-to-host read.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 112
BLUR_SIGMA = 0.8  # DALI's sigma for window_size 3 (OpenCV's rule: 0.3 * ((3 - 1) / 2 - 1) + 0.8)
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


def resample_weights(in_size: int, out_size: int, lo: float, hi: float) -> np.ndarray:
    """(out_size, in_size) float64 weights of DALI's antialiased linear resize of ROI [lo, hi]."""
    scale = (hi - lo) / out_size  # input pixels per output pixel
    radius = max(scale, 1.0)
    centres = lo + scale * (np.arange(out_size) + 0.5)
    taps = np.arange(math.floor(lo - radius) - 1, math.ceil(hi + radius) + 2)
    w = np.clip(1.0 - np.abs(taps[None, :] + 0.5 - centres[:, None]) / radius, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    out = np.zeros((out_size, in_size))
    np.add.at(out, (slice(None), np.clip(taps, 0, in_size - 1)), w)  # replicate the edge
    return out


def _u8(x: torch.Tensor) -> torch.Tensor:
    """What a DALI op's uint8 output holds, kept in float for the next op."""
    return x.round_().clamp_(0.0, 255.0)


def resize(
    x: torch.Tensor, out: int, rois: tuple[tuple[float, float], tuple[float, float]] | None = None
) -> torch.Tensor:
    """(n, C, H, W) -> (n, C, out, out); ``rois``: the (lo, hi) input ROI of the rows and of the
    columns, default the whole image."""
    h, w = x.shape[-2:]
    (lo_y, hi_y), (lo_x, hi_x) = rois if rois is not None else ((0.0, h), (0.0, w))
    wy = torch.as_tensor(resample_weights(h, out, lo_y, hi_y), dtype=x.dtype).to(x.device)
    wx = torch.as_tensor(resample_weights(w, out, lo_x, hi_x), dtype=x.dtype).to(x.device)
    return _u8(torch.matmul(torch.matmul(wy, x), wx.T))


def downscale(x: torch.Tensor, fraction: float, size: int) -> torch.Tensor:
    """``resize(resize_x=side, resize_y=side)`` then back to ``size``, side = fraction * size."""
    side = float(np.float32(fraction) * np.float32(size))  # DALI multiplies in float32
    small = max(1, math.floor(side + 0.5))
    adjust = small / side  # the ROI shrinks about its centre so that the scale stays exact
    rois = tuple((c - c * adjust, c + c * adjust) for c in (x.shape[-2] / 2, x.shape[-1] / 2))
    return resize(resize(x, small, rois), size)


def gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian, sigma 0.8, mirrored borders (reflect-101)."""
    g = torch.exp(-(torch.arange(-1.0, 2.0, dtype=torch.float64) ** 2) / (2 * BLUR_SIGMA**2))
    g = (g / g.sum()).to(x.dtype)
    kernel = torch.outer(g, g).to(x.device).expand(x.shape[1], 1, 3, 3)
    return _u8(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, groups=x.shape[1]))


def hsv_matrix(hue: float, saturation: float) -> np.ndarray:
    """DALI ``fn.hsv``'s RGB -> RGB matrix: hue in degrees, saturation a multiplier."""
    h = math.radians(hue)
    rotate = np.array([[1, 0, 0], [0, math.cos(h), math.sin(h)], [0, -math.sin(h), math.cos(h)]])
    scale = np.diag([1.0, saturation, saturation])
    return _YIQ2RGB @ rotate @ scale @ _RGB2YIQ


def colour(x: torch.Tensor, matrices: np.ndarray) -> torch.Tensor:
    """Apply one 3x3 matrix per sample to (n, 3, H, W)."""
    m = torch.as_tensor(matrices, dtype=x.dtype).to(x.device)
    return _u8(torch.einsum("nij,njhw->nihw", m, x))


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """``crop=(size, size)`` at DALI's default ``crop_pos`` 0.5; inputs at least ``size``."""
    h, w = x.shape[-2:]
    top, left = (h - size + 1) // 2, (w - size + 1) // 2  # round half up of (in - size) / 2
    return x[..., top : top + size, left : left + size]


def _subset(x: torch.Tensor, mask: np.ndarray, op) -> torch.Tensor:
    """``op`` on the samples where ``mask`` is set (chosen on the host: no device read); ``x``
    is this module's own intermediate, so it is updated in place."""
    chosen = np.flatnonzero(mask)
    if chosen.size == 0:
        return x
    if chosen.size == x.shape[0]:
        return op(x, chosen)
    index = torch.as_tensor(chosen).to(x.device)
    x[index] = op(x[index], chosen)
    return x


def augment_group(
    x: torch.Tensor,
    params: dict[str, np.ndarray],
    probs: dict[str, float],
    *,
    resize_to: bool,
    size: int,
) -> torch.Tensor:
    """(n, 3, H, W) uint8, all one size -> (n, 3, size, size) uint8 values, unnormalised (uint8
    when no step computes, else float holding uint8 values).

    ``params``: this group's (n,) arrays by ``active_params`` name; ``probs[aug] > 0`` decides,
    as in the DALI graph, whether a step exists at all.
    """
    if resize_to or any(probs[aug] > 0 for aug in ("downscale", "blur", "hsv", "gray")):
        x = x.float()  # the steps compute in float32, as DALI's kernels do
    if resize_to:
        x = resize(x, size)
    if probs["downscale"] > 0:
        fractions = params["size"]

        def shrink(sub: torch.Tensor, chosen: np.ndarray) -> torch.Tensor:
            rows = [downscale(sub[k : k + 1], fractions[i], size) for k, i in enumerate(chosen)]
            return torch.cat(rows)

        x = _subset(x, params["downscale"], shrink)
    if probs["blur"] > 0:
        x = _subset(x, params["blur"], lambda sub, _: gaussian_blur(sub))
    if probs["hsv"] > 0:
        hue, sat = params["hue"], params["saturation"]
        x = _subset(
            x,
            params["hsv"],
            lambda sub, chosen: colour(sub, np.stack([hsv_matrix(hue[i], sat[i]) for i in chosen])),
        )
    if probs["gray"] > 0:
        gray = hsv_matrix(0.0, 0.0)
        x = _subset(
            x, params["gray"], lambda sub, chosen: colour(sub, np.stack([gray] * len(chosen)))
        )
    x = centre_crop(x, size).contiguous()
    return _subset(x, params["mirror"], lambda sub, _: sub.flip(-1))


def augment_batch(
    images: list[torch.Tensor],
    params: dict[str, np.ndarray],
    probs: dict[str, float],
    *,
    resize_to: bool,
    size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Decoded HWC uint8 images -> normalised (B, 3, size, size) ``dtype``, mean = std = 127.5.

    Images of one shape go through the steps as one batch (the usual case: a single group);
    without ``resize_to`` every image must be at least ``size`` on both sides (the caller says
    which one is not, as DALI's crop would fail on it). Without augmentation or resizing the
    pixels stay uint8 until the one float pass that normalises them.
    """
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        groups[tuple(img.shape)].append(i)
    parts = []
    for members in groups.values():
        x = torch.stack([images[i].permute(2, 0, 1) for i in members])  # one copy, to NCHW
        sub = {name: values[members] for name, values in params.items()}
        parts.append((members, augment_group(x, sub, probs, resize_to=resize_to, size=size)))
    if len(parts) == 1:
        x = parts[0][1]
    else:
        x = torch.empty((len(images), 3, size, size), device=parts[0][1].device)
        for members, part in parts:
            x[torch.as_tensor(members).to(x.device)] = part.float()
    x = x.float() if x.dtype == torch.uint8 else x  # float: already this module's own copy
    return x.sub_(127.5).div_(127.5).to(dtype)
