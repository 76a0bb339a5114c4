"""Noisy synthetic data sets (issue 13): exact planted fractions, a disjoint held-out ``.bin``.

* ``make_plan``: exactly ``round(P * ids)`` identities split under two labels, each keeping
  ``ceil(n / 2)`` images; exactly ``round(P * N)`` images flipped, each to another label;
  long-tail counts follow ``max(2, floor(per_id * (i + 1) ** -alpha + 0.5))``; determinism in the
  seed; without noise the records are ``synth.generate``'s order; bad fractions name the option.
* A written set: the ``.rec`` labels are the plan's, the conflict CSV pairs exactly the two
  labels each split identity is written under, the flips CSV lists the flipped records, and the
  held-out ``.bin`` reads back through ``pfc_ds.eval.bins`` with the right pairs and labels and
  only identities no training record shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipelines.faces import generate, heldout_pairs, write_sidecars
from data_pipelines.noise import HELDOUT_FIRST, long_tail_counts, make_plan
from data_pipelines.scan import scan_rec
from pfc_ds.eval.bins import load_bin, read_bin


def test_conflict_splits_exactly_p_identities_into_two_labels() -> None:
    plan = make_plan(200, 7, conflict=0.3, seed=5)
    assert plan.num_labels == 260 and plan.conflicts.shape == (60, 2)
    assert plan.conflicts[:, 1].tolist() == list(range(200, 260))
    assert len(set(plan.conflicts[:, 0].tolist())) == 60
    assert (plan.label == plan.clean_label).all()  # no flips asked for
    for a, b in plan.conflicts.tolist():
        mine = plan.identity == a
        assert np.bincount(plan.label[mine], minlength=260)[[a, b]].tolist() == [4, 3]
        assert (plan.identity[plan.label == b] == a).all()
    untouched = ~np.isin(plan.identity, plan.conflicts[:, 0])
    assert (plan.label[untouched] == plan.identity[untouched]).all()


def test_flip_changes_exactly_p_of_the_images_to_other_labels() -> None:
    plan = make_plan(50, 9, flip=0.4, conflict=0.1, seed=2)
    n = 50 * 9
    assert plan.num_images == n and plan.flipped.size == round(0.4 * n) == 180
    changed = np.flatnonzero(plan.label != plan.clean_label)
    assert changed.tolist() == plan.flipped.tolist()  # every flip lands on another label
    assert plan.label.min() >= 0 and plan.label.max() < plan.num_labels == 55
    # Uniform over the other labels: 180 draws over 54 labels reach many of them.
    assert len(set(plan.label[plan.flipped].tolist())) > 40


def test_long_tail_counts_follow_the_rule() -> None:
    counts = long_tail_counts(1000, 40, 0.5)
    i = np.arange(1000)
    expected = np.maximum(2, np.floor(40 / np.sqrt(i + 1) + 0.5)).astype(int)
    assert counts.tolist() == expected.tolist()
    assert counts[:4].tolist() == [40, 28, 23, 20] and counts[-1] == 2 and counts.min() == 2
    plan = make_plan(1000, 40, long_tail=0.5, seed=1)
    assert np.bincount(plan.identity).tolist() == counts.tolist()
    assert plan.num_images == counts.sum()
    assert long_tail_counts(5, 3, 0.0).tolist() == [3] * 5


def test_plans_are_deterministic_in_the_seed() -> None:
    a = make_plan(100, 6, conflict=0.2, flip=0.3, long_tail=0.4, seed=9)
    b = make_plan(100, 6, conflict=0.2, flip=0.3, long_tail=0.4, seed=9)
    c = make_plan(100, 6, conflict=0.2, flip=0.3, long_tail=0.4, seed=10)
    for field in ("identity", "view", "clean_label", "label", "conflicts", "flipped"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.label, c.label)
    clean = make_plan(30, 4, seed=3)  # synth.generate's record order, identity-major views
    order = np.random.default_rng(3).permutation(120)
    assert clean.identity.tolist() == (order // 4).tolist()
    assert clean.view.tolist() == (order % 4).tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"conflict": 1.0}, "--conflict must be in [0, 1)"),
        ({"flip": -0.1}, "--flip must be in [0, 1)"),
        ({"long_tail": -1.0}, "--long-tail must be >= 0"),
    ],
)
def test_bad_options_name_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        make_plan(10, 4, **kwargs)


def _rec_labels(prefix: Path) -> np.ndarray:
    return scan_rec(prefix).labels.astype(np.int64)


def test_written_set_matches_its_plan_csvs_and_heldout_bin(tmp_path: Path) -> None:
    prefix = str(tmp_path / "train")
    plan = generate(prefix, 12, 4, seed=4, workers=1, conflict=0.25, flip=0.25)
    write_sidecars(prefix, plan, seed=4, heldout=10)
    labels = _rec_labels(Path(prefix))
    assert labels.tolist() == plan.label.tolist() and plan.num_labels == 15
    assert scan_rec(Path(prefix)).declared_classes == 15

    rows = (tmp_path / "train_conflicts.csv").read_text().splitlines()
    assert rows[0] == "label_a,label_b" and len(rows) == 1 + 3
    for row in rows[1:]:
        a, b = map(int, row.split(","))
        shown = set(plan.clean_label[plan.identity == a].tolist())  # before flips
        assert shown == {a, b} and b >= 12
    flips = (tmp_path / "train_flips.csv").read_text().splitlines()
    assert flips[0] == "record,true_label,label" and len(flips) == 1 + 12
    for row in flips[1:]:
        record, true, given = map(int, row.split(","))
        assert labels[record - 1] == given != true == plan.clean_label[record - 1]

    heldout = load_bin(tmp_path / "train_heldout.bin", image_size=56)
    images, issame, identities = heldout_pairs(10, seed=4)
    assert heldout.num_pairs == 10 and heldout.images.shape == (20, 56, 56, 3)
    assert read_bin(tmp_path / "train_heldout.bin")[0] == images  # the very JPEGs
    assert heldout.issame.tolist() == [True, False] * 5 == issame.tolist()
    pairs = identities.reshape(10, 2)
    assert ((pairs[:, 0] == pairs[:, 1]) == issame).all()
    assert identities.min() >= HELDOUT_FIRST > plan.identity.max()
    assert not set(identities.tolist()) & set(plan.identity.tolist())
