"""IJB-B / IJB-C 1:1 template verification, by insightface's protocol (arcface_torch/eval_ijbc.py).

    python -m pfc_ds.eval.ijb --checkpoint OUT --images DIR --meta DIR [--target IJBC]
        [--no-align] [--batch-size 64] [--no-flip] [--norm-score] [--detector-score]
        [--features F.npz | --rescore F.npz] [--roc roc.png] [--far-rule nearest|at-most]

Meta files in ``--meta`` (insightface ships them lower case, ``ijbc_...``; ``IJBC_...`` is
accepted too), whitespace-separated, one record a line:

* ``{target}_face_tid_mid.txt``: image name, template id, media id;
* ``{target}_template_pair_label.txt``: template id, template id, label (1 genuine, 0 impostor);
* ``{target}_name_5pts_score.txt``: image name, 5 landmarks (10 numbers), detector score.

Ids are parsed as exact int64. A wrong column or dtype here fails silently elsewhere (IJB-C
scored ~0 in insightface's #1349 evaluation script until its pair reader was replaced), so a
line with another field count, a non-integer id or a label other than 0/1 is an error naming
the file and line.

**Alignment.** ``--images`` is the folder of insightface's loose crops (``IJBC/loose_crop``),
under the names of the 5pts file. Each crop is aligned as insightface's script aligns it before
embedding: the least-squares similarity transform from its five landmarks onto the ArcFace
template, warped bilinearly to the model's input size (``pfc_ds.eval.align.norm_crop``). The
output says so (``aligned N loose crops ...``). ``--no-align`` takes crops that are already
aligned (resized to the input size if they differ from it); loose crops scored that way score
far lower, with no error.

Steps, as insightface's script:

0. each crop aligned with its five landmarks (unless ``--no-align``);
1. image features: the raw embedding of each crop, plus its mirror's unless ``--no-flip`` (F1);
2. each feature L2-normalised, unless ``--norm-score`` (N1: the norm stays as a quality weight);
   then multiplied by the detector score with ``--detector-score`` (D1);
3. media pooling: the mean of a template's images from one media (frames of one video), then a
   template is the sum of its media features, L2-normalised;
4. a pair's score is the cosine of its two templates;
5. the ROC over all pairs and TAR at FAR 1e-6 ... 1e-1.

insightface's script runs N1 D1 F1, i.e. ``--norm-score --detector-score``.

TAR@FAR (``--far-rule``): ``nearest`` (default) is insightface's: on ``sklearn.metrics.
roc_curve(label, score)`` (``drop_intermediate=True``, reimplemented here) the point whose FPR is
nearest the target in absolute difference, the highest TPR among equally near points; no
interpolation, so the FAR used can lie above the target. ``at-most``: the best TPR of any
operating point (full curve) with FPR <= target, i.e. TAR at the lowest score threshold that
keeps FAR <= target.

``--features F.npz`` saves the image features (``features``, ``features_flip`` unless
``--no-flip``; raw, float32), ``faceness`` and ``names``; ``--rescore F.npz`` scores them again
(other N/D/F choices, another rule) without a model or images.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pfc_ds.eval.align import norm_crop
from pfc_ds.eval.embedder import decoded_batches, embed_views, load_checkpoint_model

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
RULES = ("nearest", "at-most")


# --- meta files -------------------------------------------------------------------------------


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of the non-blank lines; CRLF and any whitespace separate."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such IJB meta file")
    with open(path, encoding="utf-8", errors="replace") as f:
        return [(n, line.split()) for n, line in enumerate(f, 1) if line.strip()]


def _int(path: Path, lineno: int, text: str, what: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: {what} {text!r} is not an integer") from None


def read_template_media(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``{t}_face_tid_mid.txt``: image names and their int64 template and media ids."""
    path = Path(path)
    names, tids, mids = [], [], []
    for n, fields in _lines(path):
        if len(fields) != 3:
            raise ValueError(f"{path}:{n}: expected 'name template media', got {fields}")
        names.append(fields[0])
        tids.append(_int(path, n, fields[1], "template id"))
        mids.append(_int(path, n, fields[2], "media id"))
    if not names:
        raise ValueError(f"{path}: no records")
    return names, np.array(tids, dtype=np.int64), np.array(mids, dtype=np.int64)


def read_template_pairs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``{t}_template_pair_label.txt``: int64 template ids ``t1``, ``t2`` and 0/1 labels.

    numpy's C parser reads IJB-C's 15.7M lines in seconds; on a malformed file we re-read it
    line by line only to name the bad line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such IJB meta file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data" is checked below
            table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError:
        table = None
    if table is not None and table.size == 0:
        raise ValueError(f"{path}: no records")
    if table is None or table.shape[1:] != (3,):
        for n, fields in _lines(path):
            if len(fields) != 3:
                raise ValueError(f"{path}:{n}: expected 'template template label', got {fields}")
            for text, what in zip(fields, ("template id", "template id", "label"), strict=True):
                _int(path, n, text, what)
        raise ValueError(f"{path}: could not parse the template pairs")
    labels = table[:, 2]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise ValueError(
            f"{path}: {bad.size} labels are not 0/1 (pair {int(bad[0]) + 1}: "
            f"{int(labels[bad[0]])}); expected 'template template label'"
        )
    return table[:, 0].copy(), table[:, 1].copy(), labels.copy()


def read_name_scores(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``{t}_name_5pts_score.txt``: names, float32 landmarks ``(N, K, 2)``, detector scores."""
    path = Path(path)
    names, points, scores = [], [], []
    for n, fields in _lines(path):
        if len(fields) < 2 or len(fields) % 2:
            raise ValueError(f"{path}:{n}: expected 'name x1 y1 ... xK yK score', got {fields}")
        try:
            values = [float(x) for x in fields[1:]]
        except ValueError:
            raise ValueError(f"{path}:{n}: non-numeric landmark or score in {fields}") from None
        if points and len(values) - 1 != points[0].size:
            raise ValueError(f"{path}:{n}: {len(values) - 1} landmark numbers, line 1 had "
                             f"{points[0].size}")  # fmt: skip
        names.append(fields[0])
        points.append(np.array(values[:-1], dtype=np.float32))
        scores.append(values[-1])
    if not names:
        raise ValueError(f"{path}: no records")
    return names, np.stack(points).reshape(len(names), -1, 2), np.array(scores, np.float32)


def meta_path(meta_dir: str | os.PathLike, target: str, kind: str) -> Path:
    """``meta_dir/{target}_{kind}.txt``, lower case first (insightface's names)."""
    lower = Path(meta_dir) / f"{target.lower()}_{kind}.txt"
    given = Path(meta_dir) / f"{target}_{kind}.txt"
    return given if not lower.is_file() and given.is_file() else lower


@dataclass
class IJBMeta:
    """The protocol: per image (in the 5pts file's order) its template, media, detector score
    and landmarks (``(N, K, 2)`` pixels, K = 5 in insightface's files); per pair its templates
    and label."""

    names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    faceness: np.ndarray | None
    p1: np.ndarray
    p2: np.ndarray
    labels: np.ndarray
    landmarks: np.ndarray | None = None


def align_images(
    order: list[str], names: list[str], templates: np.ndarray, medias: np.ndarray, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Templates and medias of the images ``order`` (insightface assumes both files list the
    images in one order; we match by name when they do not)."""
    if order == names:
        return templates, medias
    index = {name: i for i, name in enumerate(names)}
    if len(index) != len(names) or len(order) != len(names) or set(order) != set(index):
        missing = sorted(set(order) - set(index))[:3]
        raise ValueError(
            f"{where}: the image lists differ ({len(order)} vs {len(names)} names"
            + (f"; not in the template file: {missing}" if missing else "")
            + ")"
        )
    pick = np.array([index[name] for name in order], dtype=np.int64)
    return templates[pick], medias[pick]


def load_meta(meta_dir: str | os.PathLike, target: str, *, scores: bool = True) -> IJBMeta:
    """Read the three meta files (without ``scores``, the 5pts file is not needed: a rescore
    takes names and detector scores from the saved features)."""
    tm_path = meta_path(meta_dir, target, "face_tid_mid")
    names, templates, medias = read_template_media(tm_path)
    p1, p2, labels = read_template_pairs(meta_path(meta_dir, target, "template_pair_label"))
    faceness = landmarks = None
    if scores:
        sc_path = meta_path(meta_dir, target, "name_5pts_score")
        order, landmarks, faceness = read_name_scores(sc_path)
        templates, medias = align_images(order, names, templates, medias, str(sc_path))
        names = order
    return IJBMeta(names, templates, medias, faceness, p1, p2, labels, landmarks)


# --- scoring ----------------------------------------------------------------------------------


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)  # sklearn.preprocessing.normalize


def image_features(
    features: np.ndarray,
    features_flip: np.ndarray | None,
    faceness: np.ndarray | None,
    *,
    flip: bool = True,
    norm_score: bool = False,
    detector_score: bool = False,
) -> np.ndarray:
    """Per-image features to pool (float64): F1 adds the mirror's, N0 normalises, D1 weights."""
    x = np.asarray(features, dtype=np.float64)
    if flip:
        if features_flip is None:
            raise ValueError("no mirrored-image features (saved with --no-flip): pass --no-flip")
        x = x + np.asarray(features_flip, dtype=np.float64)
    if not norm_score:
        x = _normalize(x)
    if detector_score:
        if faceness is None:
            raise ValueError("--detector-score needs the detector scores")
        x = x * np.asarray(faceness, dtype=np.float64)[:, None]
    return x


def template_features(
    features: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised template features, sorted unique template ids): the mean over each
    (template, media) group, summed over a template's medias."""
    features = np.asarray(features, dtype=np.float64)
    if not features.shape[0] == templates.size == medias.size:
        raise ValueError(
            f"{features.shape[0]} image features for {templates.size} template / "
            f"{medias.size} media entries"
        )
    keys = np.stack([templates, medias], axis=1)
    groups, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(inverse[order])) + 1]
    counts = np.bincount(inverse, minlength=len(groups))
    media = np.add.reduceat(features[order], starts, axis=0) / counts[:, None]
    # groups are sorted by (template, media): each template's medias are contiguous
    uniq, first = np.unique(groups[:, 0], return_index=True)
    return _normalize(np.add.reduceat(media, first, axis=0)), uniq


def pair_scores(
    template_feats: np.ndarray,
    unique_templates: np.ndarray,
    p1: np.ndarray,
    p2: np.ndarray,
    chunk: int = 1 << 16,
) -> np.ndarray:
    """Cosine of each pair's template features; a template absent from the images is an error."""
    idx = []
    for p in (p1, p2):
        i = np.searchsorted(unique_templates, p)
        i[i == unique_templates.size] = 0
        missing = np.unique(p[unique_templates[i] != p])
        if missing.size:
            raise ValueError(
                f"{missing.size} templates of the pair list have no images "
                f"(e.g. {missing[:5].tolist()})"
            )
        idx.append(i)
    out = np.empty(p1.size, dtype=np.float64)
    for a in range(0, p1.size, chunk):
        b = min(a + chunk, p1.size)
        out[a:b] = np.einsum("ij,ij->i", template_feats[idx[0][a:b]], template_feats[idx[1][a:b]])
    return out


def roc_curve(
    labels: np.ndarray, scores: np.ndarray, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sklearn.metrics.roc_curve(labels, scores)``: (fpr, tpr, thresholds), starting at (0, 0)
    with threshold inf; a pair is accepted when its score >= threshold."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are not finite")
    y = y == 1
    if y.all() or not y.any():
        raise ValueError("the ROC needs both genuine (1) and impostor (0) pairs")
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    idx = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[idx]
    fps = 1 + idx - tps
    thresholds = s[idx]
    if drop_intermediate and fps.size > 2:
        keep = np.flatnonzero(np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


def tar_at_far(
    labels: np.ndarray,
    scores: np.ndarray,
    fars: tuple[float, ...] | list[float] = FARS,
    rule: str = "nearest",
) -> np.ndarray:
    """TAR at each FAR by ``rule`` (see the module docstring)."""
    if rule == "nearest":
        fpr, tpr, _ = roc_curve(labels, scores)
        fpr, tpr = fpr[::-1], tpr[::-1]  # equally near: the first, i.e. highest TPR
        return np.array([tpr[int(np.argmin(np.abs(fpr - x)))] for x in fars])
    if rule == "at-most":
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        return tpr[np.searchsorted(fpr, np.asarray(fars, dtype=np.float64), side="right") - 1]
    raise ValueError(f"unknown FAR rule {rule!r}; allowed: {', '.join(RULES)}")


@dataclass
class IJBResult:
    """TAR at ``fars`` and the ROC (sklearn's, for the plot and AUC) of one scoring."""

    fars: tuple[float, ...]
    tars: np.ndarray
    auc: float
    fpr: np.ndarray
    tpr: np.ndarray
    scores: np.ndarray
    num_templates: int
    num_genuine: int
    num_impostor: int


def score_features(
    meta: IJBMeta,
    features: np.ndarray,
    features_flip: np.ndarray | None,
    faceness: np.ndarray | None = None,
    *,
    flip: bool = True,
    norm_score: bool = False,
    detector_score: bool = False,
    rule: str = "nearest",
    fars: tuple[float, ...] = FARS,
) -> IJBResult:
    """Steps 2-5 on image features in ``meta.names`` order (``faceness`` defaults to meta's)."""
    faceness = meta.faceness if faceness is None else faceness
    x = image_features(
        features, features_flip, faceness,
        flip=flip, norm_score=norm_score, detector_score=detector_score,
    )  # fmt: skip
    feats, uniq = template_features(x, meta.templates, meta.medias)
    scores = pair_scores(feats, uniq, meta.p1, meta.p2)
    fpr, tpr, _ = roc_curve(meta.labels, scores)
    genuine = int((meta.labels == 1).sum())
    return IJBResult(
        fars=tuple(fars),
        tars=tar_at_far(meta.labels, scores, fars, rule),
        auc=float(np.trapezoid(tpr, fpr)),
        fpr=fpr,
        tpr=tpr,
        scores=scores,
        num_templates=int(uniq.size),
        num_genuine=genuine,
        num_impostor=int(meta.labels.size - genuine),
    )


# --- embedding, files, report -----------------------------------------------------------------


def embed_ijb(
    model: torch.nn.Module,
    images_dir: str | os.PathLike,
    names: list[str],
    image_size: int = 112,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    flip: bool = True,
    *,
    landmarks: np.ndarray | None = None,
    progress: bool | None = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw features of the crops ``images_dir/name`` and of their mirrors. With ``landmarks``
    (``(N, 5, 2)``, pixels) each crop is aligned first (``norm_crop``); without, the crops are
    taken as aligned and resized to ``image_size`` if they differ."""
    root = Path(images_dir)
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(names)} images are missing in {root} (first: {missing[0]})"
        )
    crop = None
    if landmarks is not None:
        landmarks = np.asarray(landmarks, dtype=np.float64)
        if landmarks.shape != (len(names), 5, 2):
            raise ValueError(
                f"alignment needs 5 landmarks per image, got shape {landmarks.shape} for "
                f"{len(names)} images (--no-align for crops already aligned)"
            )

        def crop(i: int, image: np.ndarray) -> np.ndarray:
            return norm_crop(image, landmarks[i], image_size)

    batches = decoded_batches(
        len(names),
        lambda i: (root / names[i]).read_bytes(),
        image_size,
        batch_size,
        lambda i: str(root / names[i]),
        crop=crop,
    )
    return embed_views(model, batches, batch_size, device, flip, progress=progress,
                       total=len(names))  # fmt: skip


def save_features(
    path: str | os.PathLike,
    names: list[str],
    features: np.ndarray,
    features_flip: np.ndarray | None,
    faceness: np.ndarray | None,
) -> Path:
    """Write the image features for ``--rescore`` (a plain npz: no pickle)."""
    path = Path(path)
    arrays = {"names": np.array(names, dtype=str), "features": features.astype(np.float32)}
    if features_flip is not None:
        arrays["features_flip"] = features_flip.astype(np.float32)
    if faceness is not None:
        arrays["faceness"] = np.asarray(faceness, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_features(
    path: str | os.PathLike,
) -> tuple[list[str], np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(names, features, features_flip or None, faceness or None) of ``save_features``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such features file")
    with np.load(path, allow_pickle=False) as z:
        if "names" not in z or "features" not in z:
            raise ValueError(f"{path}: not an IJB features file (no names / features)")
        names = [str(n) for n in z["names"]]
        return names, z["features"], z.get("features_flip"), z.get("faceness")


def mode_name(flip: bool, norm_score: bool, detector_score: bool) -> str:
    """insightface's label, e.g. ``N1D1F1``."""
    return f"N{int(norm_score)}D{int(detector_score)}F{int(flip)}"


def format_table(result: IJBResult, title: str) -> str:
    """The TAR table (percent), insightface's layout in plain text."""
    head = "".join(f"{x:>9.0e}" for x in result.fars) + f"{'AUC':>9}"
    row = "".join(f"{100 * t:>9.2f}" for t in result.tars) + f"{100 * result.auc:>9.2f}"
    return (
        f"{title}: {result.num_templates} templates, "
        f"{result.num_genuine + result.num_impostor} pairs ({result.num_genuine} genuine)\n"
        f"{'FAR':<8}{head}\n{'TAR (%)':<8}{row}"
    )


def plot_roc(path: str | os.PathLike, result: IJBResult, label: str) -> Path:
    """insightface's ROC figure (log FPR axis 1e-6 .. 0.1) as an image file (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(result.fpr, result.tpr, lw=1, label=f"{label} (AUC = {100 * result.auc:.4f} %)")
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 0.1)
    ax.set_ylim(0.3, 1.0)
    ax.set_xticks(list(result.fars))
    ax.grid(linestyle="--", linewidth=1)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title("ROC on IJB")
    ax.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pfc_ds.eval.ijb",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", help="training output folder or tag folder")
    p.add_argument(
        "--images", type=Path, help="folder of the crops (insightface's IJBC/loose_crop)"
    )
    p.add_argument(
        "--no-align",
        action="store_true",
        help="the crops are already aligned: skip the five-point alignment (resize only)",
    )
    p.add_argument("--meta", required=True, type=Path, help="folder of the three meta files")
    p.add_argument("--target", default="IJBC", help="IJBC or IJBB (the meta files' prefix)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-flip", action="store_true", help="F0: no mirrored images")
    p.add_argument("--norm-score", action="store_true", help="N1: keep the feature norms")
    p.add_argument("--detector-score", action="store_true", help="D1: weight by face score")
    p.add_argument("--far-rule", choices=RULES, default="nearest")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--features", type=Path, help="save the image features to this .npz")
    out.add_argument("--rescore", type=Path, help="score saved features; no model, no images")
    p.add_argument("--roc", type=Path, help="save the ROC curve as an image (e.g. roc.png)")
    args = p.parse_args(argv)
    flip = not args.no_flip
    try:
        if args.rescore is None and (args.checkpoint is None or args.images is None):
            raise ValueError("--checkpoint and --images are needed unless --rescore is given")
        if args.rescore is not None:
            names, feats, feats_flip, faceness = load_features(args.rescore)
            meta = load_meta(args.meta, args.target, scores=False)
            meta.templates, meta.medias = align_images(
                names, meta.names, meta.templates, meta.medias, str(args.rescore)
            )
            meta.names, meta.faceness = names, faceness
        else:
            meta = load_meta(args.meta, args.target)
            if not args.images.is_dir():
                raise FileNotFoundError(f"{args.images} is not a directory")
            landmarks = None if args.no_align else meta.landmarks
            if landmarks is not None and landmarks.shape[1] != 5:
                raise ValueError(
                    f"{meta_path(args.meta, args.target, 'name_5pts_score')}: "
                    f"{landmarks.shape[1]} landmarks per image; the alignment needs 5 "
                    "(--no-align for crops already aligned)"
                )
            model, image_size, _ = load_checkpoint_model(args.checkpoint, args.device)
            feats, feats_flip = embed_ijb(
                model, args.images, meta.names, image_size, args.batch_size, args.device, flip,
                landmarks=landmarks, progress=None,
            )  # fmt: skip
            n = len(meta.names)
            if landmarks is None:
                print(f"not aligned (--no-align): {n} crops taken as aligned, at "
                      f"{image_size}x{image_size}")  # fmt: skip
            else:
                print(f"aligned {n} loose crops with their five landmarks onto the ArcFace "
                      f"template at {image_size}x{image_size} (--no-align: crops already "
                      "aligned)")  # fmt: skip
            if args.features is not None:
                save_features(args.features, meta.names, feats, feats_flip, meta.faceness)
        result = score_features(
            meta, feats, feats_flip,
            flip=flip, norm_score=args.norm_score, detector_score=args.detector_score,
            rule=args.far_rule,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mode = mode_name(flip, args.norm_score, args.detector_score)
    print(format_table(result, f"{args.target} 1:1 {mode}, far rule {args.far_rule}"))
    if args.roc is not None:
        print(f"ROC -> {plot_roc(args.roc, result, f'{args.target} {mode}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
