"""insightface's 1:1 verification protocol (LFW, CFP-FP, AgeDB-30 ``.bin`` sets), in numpy.

This reproduces ``recognition/arcface_torch/eval/verification.py`` (``evaluate``: ``calculate_roc``
and ``calculate_val``) without sklearn or scipy, so numbers compare with published ones:

* rows ``2i`` and ``2i + 1`` form pair ``i``; embeddings are L2-normalised (a zero row stays
  zero, as ``sklearn.preprocessing.normalize`` leaves it) and compared by squared L2 distance
  ``d`` (``= 2 - 2 cos``); a pair is predicted "same" when ``d < t``;
* ``KFold(n_splits=nfolds, shuffle=False)``: contiguous, unshuffled test folds, the first
  ``P % nfolds`` folds one pair larger (``nfolds=1``: train = test = every pair);
* accuracy: per fold, the threshold of ``np.arange(0, 4, 0.01)`` with the best accuracy on the
  other folds (the first one on ties, like ``np.argmax``) is applied to the test fold; the
  result is the mean and the (population) std over folds;
* TAR@FAR: per fold, the threshold of ``np.arange(0, 4, 0.001)`` where the training folds' FAR
  reaches the target is interpolated as ``scipy.interpolate.interp1d(far, thresholds,
  kind='slinear')`` does in scipy <= 1.8.1, which published numbers used (0.0 if the target is
  never reached), then TAR and FAR are measured on the test fold; means over folds. Later scipy
  refuses the repeated FAR values ("Expect x to not have duplicates", insightface #2152). A test fold without genuine (impostor) pairs counts TAR
  (FAR) 0, where insightface would divide by zero.

Counts come from ``searchsorted`` on sorted distances, which is exactly ``sum(d < t)`` for every
threshold at once, so a 6000-pair set takes milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3


@dataclass(frozen=True)
class VerificationResult:
    """One set's numbers. ``threshold`` is the mean over folds of the chosen squared-L2 distance
    threshold (insightface reports none; the cosine threshold is ``1 - threshold / 2``).
    ``mean_norm`` is the mean L2 norm of the rows before normalisation (``evaluate_bin`` reports
    insightface's XNorm instead: the mean over single, unflipped and flipped, forward passes)."""

    accuracy: float
    accuracy_std: float
    threshold: float
    tar_at_far: float
    far: float
    mean_norm: float
    tar_at_far_std: float = 0.0
    far_achieved: float = 0.0  # mean FAR on the test folds at the interpolated thresholds
    num_pairs: int = 0


def kfold_bounds(num_pairs: int, nfolds: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each test fold of ``KFold(nfolds, shuffle=False)``."""
    if nfolds < 1:
        raise ValueError(f"nfolds must be >= 1, got {nfolds}")
    if nfolds == 1:
        return [(0, num_pairs)]
    if num_pairs < nfolds:
        raise ValueError(f"{num_pairs} pairs cannot be split into {nfolds} folds")
    sizes = np.full(nfolds, num_pairs // nfolds, dtype=np.int64)
    sizes[: num_pairs % nfolds] += 1
    stops = np.cumsum(sizes)
    return [(int(b - s), int(b)) for s, b in zip(sizes, stops, strict=True)]


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each pair ``(2i, 2i+1)`` after row-wise L2 normalisation."""
    x = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms == 0, 1.0, norms)
    return np.sum(np.square(x[0::2] - x[1::2]), axis=1)


def _below(dist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``[sum(dist < t) for t in thresholds]`` as int64."""
    return np.searchsorted(np.sort(dist), thresholds, side="left").astype(np.int64)


def interp_slinear(x: np.ndarray, y: np.ndarray, x_new: float) -> float:
    """scipy 1.8's ``interp1d(x, y, kind='slinear')(x_new)`` for nondecreasing ``x`` (a FAR
    curve, with repeats) and ``x[0] <= x_new <= x[-1]``.

    scipy evaluates a degree-1 B-spline with knots ``[x0, x0..x_{n-1}, x_{n-1}]``: it takes the
    last segment ``j <= n-2`` with ``x[j] <= x_new`` and, on a zero-width segment (only possible
    at the right end), returns 0.
    """
    n = x.size
    j = int(np.searchsorted(x[1 : n - 1], x_new, side="right"))
    xa, xb = float(x[j]), float(x[j + 1])
    if xb == xa:
        return 0.0
    w = 1.0 / (xb - xa)
    return float(y[j]) * (w * (xb - x_new)) + float(y[j + 1]) * (w * (x_new - xa))


def evaluate(
    embeddings: np.ndarray, issame: np.ndarray | list[bool], nfolds: int = 10
) -> VerificationResult:
    """insightface's verification numbers for ``2P`` embedding rows and ``P`` pair labels."""
    emb = np.asarray(embeddings)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    if emb.ndim != 2 or emb.shape[0] != 2 * same.size:
        raise ValueError(
            f"embeddings of shape {emb.shape} do not hold 2 rows for each of {same.size} pairs"
        )
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} embedding rows are not finite (first: row {int(np.argmax(bad))})"
        )
    mean_norm = float(np.linalg.norm(emb.astype(np.float64), axis=1).mean())
    dist = pair_distances(emb)
    folds = kfold_bounds(same.size, nfolds)
    d_same, d_diff = dist[same], dist[~same]
    # Per threshold, genuine pairs accepted (tp) and impostors accepted (fp), over all pairs.
    tp_all, fp_all = _below(d_same, ROC_THRESHOLDS), _below(d_diff, ROC_THRESHOLDS)
    fa_all = _below(d_diff, VAL_THRESHOLDS)
    nd_all = d_diff.size
    acc, best, val, far = (np.zeros(len(folds)) for _ in range(4))
    for k, (a, b) in enumerate(folds):
        d, s = dist[a:b], same[a:b]
        ns, nd = int(s.sum()), int((~s).sum())
        tp, fp = _below(d[s], ROC_THRESHOLDS), _below(d[~s], ROC_THRESHOLDS)
        fa = _below(d[~s], VAL_THRESHOLDS)
        if nfolds == 1:  # insightface's LFold: the training set is the test set
            tr_tp, tr_fp, tr_nd, tr_fa = tp, fp, nd, fa
        else:
            tr_tp, tr_fp, tr_nd, tr_fa = tp_all - tp, fp_all - fp, nd_all - nd, fa_all - fa
        i = int(np.argmax(tr_tp + (tr_nd - tr_fp)))  # most correct decisions on training folds
        best[k] = ROC_THRESHOLDS[i]
        acc[k] = float(tp[i] + nd - fp[i]) / float(b - a)

        far_train = tr_fa / tr_nd if tr_nd else np.zeros(VAL_THRESHOLDS.size)
        t = 0.0
        if far_train.max() >= FAR_TARGET:
            t = interp_slinear(far_train, VAL_THRESHOLDS, FAR_TARGET)
        val[k] = float(np.sum(d[s] < t)) / ns if ns else 0.0
        far[k] = float(np.sum(d[~s] < t)) / nd if nd else 0.0
    return VerificationResult(
        accuracy=float(np.mean(acc)),
        accuracy_std=float(np.std(acc)),
        threshold=float(np.mean(best)),
        tar_at_far=float(np.mean(val)),
        far=FAR_TARGET,
        mean_norm=mean_norm,
        tar_at_far_std=float(np.std(val)),
        far_achieved=float(np.mean(far)),
        num_pairs=int(same.size),
    )
