"""Synthetic identities: ``python -m data_pipelines.synth OUT_PREFIX --ids 1000 --per-id 20``.

Each identity is a random face-like prototype (skin-toned oval, eyes, brows, nose, mouth, with
per-identity geometry, colours and shading); its images are perturbed views (random background,
shift, brightness, noise, flip). Identities differ far more than views of one identity do, so a
model can learn them: the demo's loss falls and its verification accuracy rises, with real JPEG
decode cost and no download.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from tqdm import tqdm

from .insightface import IMAGE_SIZE, write_dataset
from .jpeg import encode_jpeg
from .pool import mapper

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return (((_XX - cx) / rx) ** 2 + ((_YY - cy) / ry) ** 2) <= 1.0


def prototype(identity: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The identity's canonical face: (112x112x3 float image in [0, 255], bool face mask)."""
    rng = np.random.default_rng([seed, identity])
    s = IMAGE_SIZE
    img = np.zeros((s, s, 3), np.float32)
    skin = rng.uniform(90, 240) * np.array([1.0, 0.82, 0.68]) + rng.normal(0, 12, 3)
    mask = _ellipse(
        s / 2 + rng.uniform(-4, 4),
        s * 0.52,
        s * rng.uniform(0.28, 0.38),
        s * rng.uniform(0.36, 0.46),
    )
    coarse = rng.normal(0, 14, (4, 4, 1)).astype(np.float32)  # identity-specific shading
    texture = np.kron(coarse, np.ones((s // 4, s // 4, 1), np.float32))
    img[:] = skin + texture
    eye_y, eye_dx = s * rng.uniform(0.38, 0.46), s * rng.uniform(0.12, 0.19)
    eye_r, iris = s * rng.uniform(0.035, 0.06), rng.uniform(0, 160, 3)
    brow = rng.uniform(0, 90, 3)
    for side in (-1, 1):
        cx = s / 2 + side * eye_dx
        img[_ellipse(cx, eye_y, eye_r * 1.6, eye_r)] = 245
        img[_ellipse(cx, eye_y, eye_r * 0.7, eye_r * 0.7)] = iris
        img[_ellipse(cx, eye_y - s * rng.uniform(0.07, 0.1), eye_r * 1.8, s * 0.015)] = brow
    nose_len = s * rng.uniform(0.08, 0.16)
    img[_ellipse(s / 2, eye_y + nose_len, s * rng.uniform(0.03, 0.06), nose_len * 0.5)] = (
        skin * 0.75
    )
    mouth_y = eye_y + nose_len + s * rng.uniform(0.1, 0.16)
    lips = rng.uniform([120, 20, 30], [220, 90, 110])
    img[_ellipse(s / 2, mouth_y, s * rng.uniform(0.08, 0.16), s * rng.uniform(0.015, 0.04))] = lips
    return np.clip(img, 0, 255), mask


def view(face: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One view: random background, shift up to 6 px, brightness x0.75-1.25, noise, flip.

    The background is drawn per view so that only the face carries the identity.
    """
    proto, mask = face
    img = np.where(mask[..., None], proto, rng.uniform(20, 235, 3).astype(np.float32))
    dy, dx = rng.integers(-6, 7, 2)
    img = np.roll(img, (int(dy), int(dx)), axis=(0, 1))
    img = img * rng.uniform(0.75, 1.25) + rng.normal(0, rng.uniform(3, 12), img.shape)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode_identity(args: tuple[int, int, int]) -> list[bytes]:
    identity, per_id, seed = args
    proto = prototype(identity, seed)
    rng = np.random.default_rng([seed, identity, 1])
    return [encode_jpeg(view(proto, rng), quality=90) for _ in range(per_id)]


def generate(
    prefix: str,
    ids: int,
    per_id: int,
    *,
    seed: int = 0,
    workers: int | None = None,
    shuffle: bool = True,
    progress: bool = False,
) -> None:
    """Write ``ids * per_id`` images in insightface layout (shuffled order unless ``shuffle``)."""
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(i, per_id, seed) for i in range(ids)]
    with mapper(workers) as pmap:
        done = pmap(_encode_identity, jobs, chunksize=max(1, ids // (workers * 8)))
        jpegs = list(tqdm(done, total=ids, desc="encode", unit="id", disable=not progress))
    items = [(c, j) for c, batch in enumerate(jpegs) for j in batch]
    ranges = None
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]
    else:
        ranges = [(1 + c * per_id, 1 + (c + 1) * per_id) for c in range(ids)]
    write_dataset(prefix, items, num_images=len(items), num_classes=ids, identity_ranges=ranges)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipelines.synth", description=__doc__.splitlines()[0]
    )
    ap.add_argument("out_prefix", help="writes OUT_PREFIX.rec, OUT_PREFIX.idx and a property file")
    ap.add_argument("--ids", type=int, default=1000)
    ap.add_argument("--per-id", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument(
        "--sorted", action="store_true", help="group images by identity (insightface order)"
    )
    a = ap.parse_args(argv)
    generate(
        a.out_prefix,
        a.ids,
        a.per_id,
        seed=a.seed,
        workers=a.workers,
        shuffle=not a.sorted,
        progress=True,
    )
    print(f"wrote {a.ids * a.per_id} images of {a.ids} identities to {a.out_prefix}.rec")


if __name__ == "__main__":
    main()
