"""Five-point face alignment onto insightface's ArcFace template, as insightface aligns IJB.

insightface distributes IJB-B/C as loose crops with five landmarks per image (eyes, nose tip,
mouth corners) and aligns each crop before embedding it (``eval_ijbc.py``,
``insightface.utils.face_align.norm_crop``): the least-squares similarity transform from the
five points to the ArcFace template (Umeyama's method, as ``skimage.transform.
SimilarityTransform.estimate``), then a bilinear warp to a 112x112 crop with black outside
the image. Every model trained on insightface's aligned data expects that framing; a loose crop
resized instead scores far lower, with no error.

``norm_crop`` reproduces it: the same template (scaled for other sizes as insightface does),
the same estimate in float64, and the warp by Pillow (``Image.transform`` with the inverse
affine map, bilinear, on float planes rounded to the nearest grey level as OpenCV rounds)
instead of OpenCV. Coordinates are pixel indices (the centre of the
top-left pixel is ``(0, 0)``), as detectors and OpenCV give them; the half-pixel shift between
that and Pillow's convention (pixel centres at ``+0.5``) is applied here. One difference
remains, at the source image's border only: OpenCV blends the last pixel with the black border
over one pixel, Pillow repeats the edge pixel up to the image's edge and is black beyond.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# insightface's arcface_dst (python-package/insightface/utils/face_align.py) for 112x112: left
# eye, right eye, nose tip, left and right mouth corner, (x, y) in pixels; eval_ijbc.py's
# template is the same (its 96-wide one shifted by 8 px).
ARCFACE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def arcface_template(image_size: int = 112) -> np.ndarray:
    """The five template points for an ``image_size`` crop (float64, 5x2).

    insightface's rule: a multiple of 112 scales the 112 template by ``size / 112``; a multiple
    of 128 scales it by ``size / 128`` and shifts it right by ``8 * size / 128`` (the 112 face
    centred in a 128 crop). insightface refuses other sizes; here they scale by ``size / 112``
    (a model trained at 56 px gets the 112 crop's framing at half the size).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if image_size % 112 != 0 and image_size % 128 == 0:
        ratio = image_size / 128.0
        return ARCFACE_112 * ratio + np.array([8.0 * ratio, 0.0])
    return ARCFACE_112 * (image_size / 112.0)


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 similarity (rotation, uniform scale, translation; no reflection) that maps
    ``src`` onto ``dst`` (N x 2 each) with the least squared error: Umeyama (1991), the
    algorithm of ``skimage.transform.SimilarityTransform.estimate``, in float64. NaN when the
    source points all coincide."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    d = np.ones(dim)
    if np.linalg.det(cov) < 0:
        d[-1] = -1.0
    t = np.eye(dim + 1)
    u, s, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        return np.full((dim + 1, dim + 1), np.nan)
    if rank == dim - 1:  # collinear points: the sign comes from U and V, not from det(cov)
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            t[:dim, :dim] = u @ vt
        else:
            flip = d.copy()
            flip[-1] = -1.0
            t[:dim, :dim] = u @ np.diag(flip) @ vt
    else:
        t[:dim, :dim] = u @ np.diag(d) @ vt
    scale = (s @ d) / src_c.var(axis=0).sum()
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean)
    t[:dim, :dim] *= scale
    return t


def estimate_norm(landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """The 2x3 affine matrix taking image pixels to the aligned crop (insightface's
    ``estimate_norm``: what ``cv2.warpAffine`` would be given)."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"landmarks must be 5 (x, y) points, shape (5, 2); got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"landmarks are not finite: {points.tolist()}")
    m = umeyama(points, arcface_template(image_size))
    if not np.isfinite(m).all() or abs(np.linalg.det(m[:2, :2])) < 1e-12:
        raise ValueError(f"landmarks are degenerate (all five points coincide): {points.tolist()}")
    return m[:2, :]


def warp_affine(image: np.ndarray, matrix: np.ndarray, image_size: int) -> np.ndarray:
    """``cv2.warpAffine(image, matrix, (image_size, image_size))`` by Pillow: output pixel
    ``p`` takes the bilinear sample of ``image`` at ``matrix^-1 p`` (pixel-index coordinates),
    black outside the image."""
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)
    a = inv[:2, :2]
    # Pillow samples the input at a @ (q + 0.5) + c in coordinates whose pixel centres lie at
    # +0.5, for output pixel q; we want a @ q + inv[:2, 2] in pixel-index coordinates.
    c = inv[:2, 2] - a @ np.array([0.5, 0.5]) + 0.5
    coeffs = tuple(float(v) for v in (a[0, 0], a[0, 1], c[0], a[1, 0], a[1, 1], c[1]))
    # One float ("F") plane per channel, rounded here: Pillow's 8-bit bilinear truncates (a
    # bias of -0.5 grey levels, and an exact 20 sampled 1e-12 px off becomes 19); OpenCV rounds.
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., k], dtype=np.float32)).transform(
                (image_size, image_size),
                Image.Transform.AFFINE,
                coeffs,
                resample=Image.Resampling.BILINEAR,
                fillcolor=0.0,
            )
        )
        for k in range(3)
    ]
    return np.clip(np.rint(np.stack(planes, axis=-1)), 0, 255).astype(np.uint8)


def norm_crop(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """The aligned ``image_size`` x ``image_size`` x 3 uint8 crop of ``image`` (H x W x 3
    uint8 RGB) whose five ``landmarks`` (5 x 2, pixel x then y: left eye, right eye, nose tip,
    left and right mouth corner) land on the ArcFace template: insightface's ``norm_crop``."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB (H, W, 3), got {image.dtype} {image.shape}")
    return warp_affine(image, estimate_norm(landmarks, image_size), image_size)
