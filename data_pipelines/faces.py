"""Synthetic faces: the one generator of face-like identities, their held-out verification
pairs, and insightface-layout data sets of them (``python -m data_pipelines.synth`` is its CLI).

Each identity is a random face-like prototype (skin-toned oval, eyes, brows, nose, mouth, with
per-identity geometry, colours and shading); its images are perturbed views (random background,
shift, brightness, noise, flip). Identities differ far more than views of one identity do, so a
model can learn them: the demo's loss falls and its verification accuracy rises, with real JPEG
decode cost and no download. Label noise for robustness experiments is planned by
``data_pipelines.noise``; ``write_sidecars`` records it next to the set, with a clean held-out
``.bin`` of identities the set never shows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .insightface import IMAGE_SIZE, split_prefix, write_bin, write_dataset
from .jpeg import encode_jpeg
from .noise import HELDOUT_FIRST, Plan, make_plan
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
    conflict: float = 0.0,
    flip: float = 0.0,
    long_tail: float = 0.0,
) -> Plan:
    """Write the images of ``make_plan(ids, per_id, ...)`` in insightface layout and return the
    plan: ``ids * per_id`` clean images in shuffled order by default; ``conflict``, ``flip`` and
    ``long_tail`` plant label noise (``data_pipelines.noise``). ``shuffle=False`` groups the
    images by identity, which only a clean set can do."""
    if ids >= HELDOUT_FIRST:
        raise ValueError(f"--ids must be < {HELDOUT_FIRST} (held-out identities start there)")
    plan = make_plan(ids, per_id, conflict=conflict, flip=flip, long_tail=long_tail, seed=seed)
    noisy = bool(plan.num_labels != ids or plan.flipped.size or long_tail)
    if not shuffle and noisy:
        raise ValueError("--sorted cannot be combined with --conflict, --flip or --long-tail")
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(i, int(n), seed) for i, n in enumerate(plan.counts)]
    with mapper(workers) as pmap:
        done = pmap(_encode_identity, jobs, chunksize=max(1, ids // (workers * 8)))
        jpegs = list(tqdm(done, total=ids, desc="encode", unit="id", disable=not progress))
    if shuffle:
        items = [
            (lab, jpegs[i][v])
            for lab, i, v in zip(
                plan.label.tolist(), plan.identity.tolist(), plan.view.tolist(), strict=True
            )
        ]
        ranges = None
    else:
        items = [(c, j) for c, batch in enumerate(jpegs) for j in batch]
        ranges = [(1 + c * per_id, 1 + (c + 1) * per_id) for c in range(ids)]
    write_dataset(
        prefix, items, num_images=len(items), num_classes=plan.num_labels, identity_ranges=ranges
    )
    return plan


def write_sidecars(prefix: str, plan: Plan, *, seed: int, heldout: int) -> list[Path]:
    """Next to ``PREFIX.rec``: ``PREFIX_conflicts.csv`` (label_a,label_b: one identity under two
    labels), ``PREFIX_flips.csv`` (record,true_label,label: record = the .rec key),
    ``PREFIX_noise.json`` (the plan's sizes) and, for ``heldout > 0`` pairs,
    ``PREFIX_heldout.bin`` (clean pairs of identities never trained on)."""
    prefix = split_prefix(prefix)
    out = [Path(f"{prefix}_conflicts.csv"), Path(f"{prefix}_flips.csv")]
    _write_csv(out[0], "label_a,label_b", plan.conflicts.tolist())
    rows = zip(
        (plan.flipped + 1).tolist(),
        plan.clean_label[plan.flipped].tolist(),
        plan.label[plan.flipped].tolist(),
        strict=True,
    )
    _write_csv(out[1], "record,true_label,label", rows)
    summary = {
        "identities": int(plan.counts.size),
        "labels": plan.num_labels,
        "images": plan.num_images,
        "conflicts": len(plan.conflicts),
        "flipped": int(plan.flipped.size),
        "images_per_identity": {
            "max": int(plan.counts.max()),
            "min": int(plan.counts.min()),
            "mean": float(plan.counts.mean()),
        },
        "seed": seed,
        "heldout_pairs": heldout,
    }
    out.append(Path(f"{prefix}_noise.json"))
    out[-1].write_text(json.dumps(summary, indent=1) + "\n")
    if heldout > 0:
        images, issame, _ = heldout_pairs(heldout, seed=seed)
        out.append(write_bin(f"{prefix}_heldout.bin", images, issame))
    return out


def _write_csv(path: Path, header: str, rows) -> None:
    with open(path, "w") as f:
        f.write(header + "\n")
        f.writelines(",".join(map(str, row)) + "\n" for row in rows)


def heldout_pairs(
    num_pairs: int,
    *,
    seed: int = 0,
    first_identity: int = HELDOUT_FIRST,
    image_size: int = IMAGE_SIZE,
) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """A verification set of identities no training set holds: ``(jpegs, issame, identities)``.

    ``2P`` JPEGs (pair ``i`` = images ``2i``, ``2i + 1``; resized to ``image_size``),
    ``issame`` alternating True/False (every contiguous fold of the protocol holds both kinds)
    and the identity of each image, drawn from a pool of ``max(2, P)`` identities from
    ``first_identity`` on. With the training set's ``seed`` the faces come from its
    distribution but none of its identities, which is what a verification set measures.
    """
    if num_pairs < 1 or first_identity < 0:
        raise ValueError(
            f"held-out pairs need num_pairs >= 1 and first_identity >= 0, got {num_pairs}, "
            f"{first_identity}"
        )
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
        img = view(faces[identity], rng)
        if image_size != img.shape[0]:
            img = np.asarray(Image.fromarray(img).resize((image_size, image_size)))
        jpegs.append(encode_jpeg(img, quality=90))
    return jpegs, issame, identities
