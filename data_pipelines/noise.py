"""Label plans for noisy synthetic data sets: inter-class conflict, label flips, long tail.

A plan says, for every image record in file order, which identity's prototype it shows, which
view of it, and which label it is written under. It is pure numpy, a function of its arguments
and ``seed`` only, so a data set and the CSVs describing its planted noise always agree, and the
experiments can regenerate the same set anywhere. The noise is what the Partial FC paper plants
in WebFace12M to test robustness (An et al., 2022, section 4.3):

* **long tail** (``long_tail = alpha > 0``): identity ``i`` gets
  ``n_i = max(2, floor(per_id * (i + 1) ** -alpha + 0.5))`` images, so identity 0 (the head)
  gets ``per_id`` and every identity at least 2 (a conflict split needs two). Prototypes are
  i.i.d., so ranking by identity index carries no other meaning. ``alpha = 0``: ``per_id`` each.
* **conflict** (fraction ``P``): ``round(P * ids)`` identities, drawn without replacement, are
  split under two labels: the ``j``-th of them (in increasing identity order) keeps its own label
  for a random ``ceil(n / 2)`` of its images and gives the other ``floor(n / 2)`` to the new label
  ``ids + j``. Labels: ``ids + round(P * ids)``. ``conflicts`` lists ``(label, new label)``.
* **flip** (fraction ``P``): exactly ``round(P * N)`` of the ``N`` images, drawn without
  replacement, get a label drawn uniformly from the *other* labels (after the conflict split).

Records are in the shuffled order of ``data_pipelines.synth.generate`` (one permutation of the
identity-major list by ``default_rng(seed)``), so a plan without noise writes the same file as
the plain generator. Each decision draws from its own stream of ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HELDOUT_FIRST = 1 << 24  # first held-out identity (data_pipelines.heldout); ids stay below
MIN_LONG_TAIL = 2  # images of a tail identity: a conflict split needs two
_CONFLICT_STREAM, _SPLIT_STREAM, _FLIP_STREAM = 11, 12, 13


@dataclass(frozen=True)
class Plan:
    """Per record (file order): ``identity``, ``view`` (index among its identity's images),
    ``clean_label`` (identity or its conflict twin) and ``label`` (written; differs from
    ``clean_label`` exactly at ``flipped``). ``counts[i]``: images of identity ``i``."""

    identity: np.ndarray
    view: np.ndarray
    clean_label: np.ndarray
    label: np.ndarray
    num_labels: int
    counts: np.ndarray
    conflicts: np.ndarray  # (K, 2) int64: (original label, twin label)
    flipped: np.ndarray  # (F,) record positions (0-based, sorted)

    @property
    def num_images(self) -> int:
        return int(self.label.size)


def check_fraction(name: str, value: float) -> float:
    """``value`` as a float in [0, 1), or a ``ValueError`` naming ``name``."""
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return p


def long_tail_counts(ids: int, per_id: int, alpha: float) -> np.ndarray:
    """Images per identity: ``max(2, floor(per_id * (i + 1) ** -alpha + 0.5))``; ``alpha = 0``
    gives ``per_id`` for every identity (see the module docstring)."""
    if alpha < 0:
        raise ValueError(f"--long-tail must be >= 0, got {alpha}")
    if alpha == 0:
        return np.full(ids, per_id, np.int64)
    if per_id < MIN_LONG_TAIL:
        raise ValueError(f"--long-tail needs --per-id >= {MIN_LONG_TAIL}, got {per_id}")
    raw = np.floor(per_id * np.arange(1, ids + 1, dtype=np.float64) ** -alpha + 0.5)
    return np.maximum(MIN_LONG_TAIL, raw).astype(np.int64)


def make_plan(
    ids: int,
    per_id: int,
    *,
    conflict: float = 0.0,
    flip: float = 0.0,
    long_tail: float = 0.0,
    seed: int = 0,
) -> Plan:
    """The plan of a data set of ``ids`` identities (see the module docstring for each rule)."""
    if ids < 2 or per_id < 1:
        raise ValueError(f"need --ids >= 2 and --per-id >= 1, got {ids} and {per_id}")
    conflict = check_fraction("--conflict", conflict)
    flip = check_fraction("--flip", flip)
    counts = long_tail_counts(ids, per_id, float(long_tail))
    identity = np.repeat(np.arange(ids, dtype=np.int64), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    view = np.arange(identity.size, dtype=np.int64) - np.repeat(starts, counts)

    clean = identity.copy()
    num_conflicts = round(conflict * ids)
    if num_conflicts and counts.min() < 2:
        raise ValueError(f"--conflict splits an identity's images in two: --per-id {per_id} < 2")
    chosen = np.sort(
        np.random.default_rng([seed, _CONFLICT_STREAM]).choice(ids, num_conflicts, replace=False)
    )
    split_rng = np.random.default_rng([seed, _SPLIT_STREAM])
    for j, c in enumerate(chosen.tolist()):
        n = int(counts[c])
        moved = split_rng.choice(n, n // 2, replace=False)
        clean[starts[c] + moved] = ids + j
    conflicts = np.stack([chosen, ids + np.arange(num_conflicts)], 1).astype(np.int64)
    num_labels = ids + num_conflicts

    order = np.random.default_rng(seed).permutation(identity.size)  # synth.generate's order
    identity, view, clean = identity[order], view[order], clean[order]

    label = clean.copy()
    flipped = np.sort(
        np.random.default_rng([seed, _FLIP_STREAM]).choice(
            label.size, round(flip * label.size), replace=False
        )
    )
    offset = np.random.default_rng([seed, _FLIP_STREAM, 1]).integers(
        1, num_labels, size=flipped.size
    )
    label[flipped] = (clean[flipped] + offset) % num_labels
    return Plan(identity, view, clean, label, num_labels, counts, conflicts, flipped)
