"""``pfc_ds.eval.align``: insightface's five-point ArcFace alignment.

* The template is insightface's ``arcface_dst``, scaled for other sizes by insightface's rule.
* The estimate equals two float64 references written here: a port of Umeyama's algorithm (as
  ``skimage.transform.SimilarityTransform.estimate`` runs it) and the linear least-squares
  solve over ``(a, b, tx, ty)`` of ``[[a, -b, tx], [b, a, ty]]``, a different method for the same
  minimum; on points that are an exact similarity of the template it recovers that similarity.
* The warp equals a float64 bilinear sampler with OpenCV's pixel convention (output pixel ``p``
  samples the input at ``M^-1 p``) to the grey level, and is exact for the identity and integer
  shifts (a half-pixel slip would blur both).
* A face-like image rendered rotated, scaled and shifted by a known similarity aligns back onto
  the same face rendered in the template frame within a fraction of a grey level on average
  (a plain resize of the loose crop misses by tens).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pfc_ds.eval.align import (
    ARCFACE_112,
    arcface_template,
    estimate_norm,
    norm_crop,
    umeyama,
    warp_affine,
)

# insightface's python-package/insightface/utils/face_align.py, arcface_dst
INSIGHTFACE_ARCFACE_DST = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
]


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    return np.array([[c, -s, tx], [s, c, ty], [0.0, 0.0, 1.0]])


def _apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ m[:2, :2].T + m[:2, 2]


def _umeyama_reference(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Umeyama (1991), eq. 34-42, in float64, written out for the full-rank 2-D case."""
    src, dst = src.astype(np.float64), dst.astype(np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sigma_s2 = ((src - mu_s) ** 2).sum(1).mean()
    cov = (dst - mu_d).T @ (src - mu_s) / len(src)
    u, d, vt = np.linalg.svd(cov)
    signs = np.diag([1.0, -1.0 if np.linalg.det(cov) < 0 else 1.0])
    r = u @ signs @ vt
    c = np.trace(np.diag(d) @ signs) / sigma_s2
    t = mu_d - c * r @ mu_s
    return np.vstack([np.hstack([c * r, t[:, None]]), [0, 0, 1]])


def _least_squares_reference(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """min over (a, b, tx, ty) of sum |[[a, -b], [b, a]] src + t - dst|^2, by lstsq."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src.tolist(), dst.tolist(), strict=True):
        rows += [[x, -y, 1.0, 0.0], [y, x, 0.0, 1.0]]
        rhs += [u, v]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty], [0.0, 0.0, 1.0]])


def test_template_is_insightfaces_and_scales_as_insightface_does():
    np.testing.assert_array_equal(ARCFACE_112, np.array(INSIGHTFACE_ARCFACE_DST))
    np.testing.assert_array_equal(arcface_template(112), ARCFACE_112)
    np.testing.assert_allclose(arcface_template(224), 2 * ARCFACE_112, rtol=0, atol=1e-12)
    # A multiple of 128: ratio size/128 and the x shift 8 * ratio (insightface's estimate_norm).
    np.testing.assert_allclose(
        arcface_template(128), ARCFACE_112 + np.array([8.0, 0.0]), atol=1e-12
    )
    np.testing.assert_allclose(arcface_template(256), 2 * ARCFACE_112 + [16.0, 0], atol=1e-12)
    np.testing.assert_allclose(arcface_template(56), ARCFACE_112 / 2, atol=1e-12)
    with pytest.raises(ValueError, match="image_size must be >= 1"):
        arcface_template(0)


def test_estimate_matches_two_float64_references():
    rng = np.random.default_rng(0)
    for trial in range(200):
        truth = _similarity(rng.uniform(-180, 180), rng.uniform(0.3, 5), *rng.uniform(-50, 300, 2))
        # Detected points: the template moved by `truth`, then a few pixels of detector noise.
        points = _apply(truth, ARCFACE_112) + rng.normal(0, rng.uniform(0, 4), (5, 2))
        got = umeyama(points, ARCFACE_112)
        for ref in (_umeyama_reference, _least_squares_reference):
            want = ref(points, ARCFACE_112)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-9, err_msg=f"{trial} {ref}")
        np.testing.assert_allclose(estimate_norm(points), got[:2], rtol=0, atol=0)
        # A similarity: equal diagonal, opposite off-diagonal, positive determinant.
        assert got[0, 0] == pytest.approx(got[1, 1], abs=1e-12)
        assert got[0, 1] == pytest.approx(-got[1, 0], abs=1e-12)
        assert np.linalg.det(got[:2, :2]) > 0


def test_exact_similarity_of_the_template_is_recovered_exactly():
    for size in (112, 128, 224):
        truth = _similarity(23.0, 1.7, 31.5, -12.25)
        points = _apply(truth, arcface_template(size))
        m = estimate_norm(points, size)
        np.testing.assert_allclose(m, np.linalg.inv(truth)[:2], rtol=0, atol=1e-12)
        np.testing.assert_allclose(_apply(np.vstack([m, [0, 0, 1]]), points),
                                   arcface_template(size), rtol=0, atol=1e-10)  # fmt: skip


def test_bad_landmarks_and_images_are_one_clear_error():
    image = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(ValueError, match=r"shape \(5, 2\); got \(4, 2\)"):
        norm_crop(image, ARCFACE_112[:4])
    with pytest.raises(ValueError, match="not finite"):
        norm_crop(image, np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match="degenerate"):
        norm_crop(image, np.full((5, 2), 7.0))
    with pytest.raises(ValueError, match=r"uint8 RGB \(H, W, 3\), got float32 \(50, 50, 3\)"):
        norm_crop(image.astype(np.float32), ARCFACE_112)


def _bilinear_reference(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """Float64 bilinear sample of ``image`` at ``M^-1 (x, y)`` per output pixel (pixel-index
    coordinates), NaN where the 2x2 neighbourhood leaves the image."""
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    h, w = image.shape[:2]
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < w) & (y0 + 1 < h)
    x0c, y0c = np.clip(x0, 0, w - 2), np.clip(y0, 0, h - 2)
    im = image.astype(np.float64)
    out = (
        im[y0c, x0c] * (1 - fx) * (1 - fy)
        + im[y0c, x0c + 1] * fx * (1 - fy)
        + im[y0c + 1, x0c] * (1 - fx) * fy
        + im[y0c + 1, x0c + 1] * fx * fy
    )
    out[~inside] = np.nan
    return out


def test_warp_matches_a_float64_bilinear_reference():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (180, 150, 3)).astype(np.uint8)
    for angle, scale in ((0.0, 1.0), (17.0, 0.8), (-40.0, 1.1), (90.0, 1.25), (33.0, 0.37)):
        # The crop's centre onto the image's, rotated and scaled: M takes the image to the crop.
        to_centre = _similarity(0.0, 1.0, 75.0, 90.0) @ _similarity(angle, scale, 0.0, 0.0)
        m = np.linalg.inv(to_centre @ _similarity(0.0, 1.0, -56.0, -56.0))[:2]
        got = warp_affine(image, m, 112).astype(np.float64)
        want = _bilinear_reference(image, m, 112)
        inside = ~np.isnan(want)
        assert inside.mean() > 0.5
        err = np.abs(got - want)[inside]
        assert err.max() <= 0.5 + 1e-6, (angle, err.max())  # rounding to the nearest level
    # The identity and integer shifts sample exact pixel centres: exact copies.
    np.testing.assert_array_equal(norm_crop(image[:112, :112], ARCFACE_112), image[:112, :112])
    shifted = norm_crop(
        image, ARCFACE_112 + np.array([13.0, 21.0])
    )  # the face 13 px right, 21 px down
    np.testing.assert_array_equal(shifted, image[21 : 21 + 112, 13 : 13 + 112])


def test_outside_the_image_is_black():
    image = np.full((40, 40, 3), 200, np.uint8)
    out = norm_crop(image, ARCFACE_112 * 4)  # the crop spans 448 px: the image is its corner
    assert (out[:9, :9] == 200).all()
    assert (out[11:] == 0).all() and (out[:, 11:] == 0).all()


# --- a face-like image whose landmarks are known -----------------------------------------------


def _face(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """A smooth face in the 112 template frame at points (x, y): skin oval on a background,
    dark eyes, a nose and lips at the five template points; float RGB in [0, 255]."""
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = ARCFACE_112.tolist()
    background = np.array([60.0, 110.0, 170.0])
    skin = np.array([225.0, 180.0, 150.0])
    oval = 1 / (1 + np.exp(((((xs - 56) / 40) ** 2 + ((ys - 66) / 52) ** 2) ** 0.5 - 1) * 40))
    img = background + oval[..., None] * (skin - background)
    shading = 12 * np.sin(xs / 9.0) * np.cos(ys / 13.0)  # texture, so rotation is visible
    img += shading[..., None] * oval[..., None]

    def blob(cx, cy, sx, sy, colour, weight=1.0):
        g = weight * np.exp(-(((xs - cx) / sx) ** 2 + ((ys - cy) / sy) ** 2) / 2)
        return g[..., None] * (np.asarray(colour) - img)

    for cx, cy in ((lx, ly), (rx, ry)):
        img += blob(cx, cy, 5.0, 2.6, [250, 250, 250])
        img += blob(cx, cy, 2.0, 2.0, [40, 25, 20])
        img += blob(cx, cy - 9, 6.0, 1.3, [70, 50, 40], 0.8)  # brow
    img += blob(nx, ny, 3.0, 5.0, [170, 120, 100], 0.8)
    mx, my = (mlx + mrx) / 2, (mly + mry) / 2
    img += blob(mx, my, (mrx - mlx) / 2.5, 2.6, [170, 50, 60])
    return np.clip(img, 0, 255)


def _render(similarity: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The face as a camera sees it after ``similarity`` (template frame -> image): each
    pixel evaluates the face at its preimage, so no resampling is involved. The default
    ``shape`` holds the whole 112 template square and 10 px more."""
    if shape is None:
        corners = _apply(similarity, np.array([[0.0, 0], [112, 0], [0, 112], [112, 112]]))
        assert corners.min() >= 0, corners  # the tests' translations keep it in view
        shape = tuple(int(v) + 10 for v in corners.max(axis=0)[::-1])
    inv = np.linalg.inv(similarity)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    tx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    ty = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    return np.rint(_face(tx, ty)).astype(np.uint8)


@pytest.mark.parametrize(
    "angle,scale,tx,ty",
    [
        (25.0, 2.2, 120.0, 15.0),
        (-60.0, 1.4, 20.0, 150.0),
        (8.0, 0.9, 30.0, 20.0),
        (180, 1, 130, 125),
    ],
)
def test_a_rotated_scaled_face_aligns_back_to_the_template(angle, scale, tx, ty):
    aligned = _render(np.eye(3), (112, 112)).astype(np.float64)
    camera = _similarity(angle, scale, tx, ty)
    loose = _render(camera)
    landmarks = _apply(camera, ARCFACE_112)
    got = norm_crop(loose, landmarks).astype(np.float64)
    assert got.shape == (112, 112, 3)
    diff = np.abs(got - aligned)
    assert diff.mean() < 0.5, diff.mean()  # measured: 0.0 to 0.23
    # The test can tell: the loose crop merely resized, as --no-align would, is far off.
    from PIL import Image

    resized = np.asarray(Image.fromarray(loose).resize((112, 112), Image.Resampling.BILINEAR))
    assert np.abs(resized.astype(np.float64) - aligned).mean() > 20
