"""Where the planted twins' centres end up, per sample rate: the conflict claim's mechanism.

    python -m pfc_ds.experiments.twins OUTPUT [--thresholds 0.7,0.9]

The paper argues that with sampled negatives the two labels of one identity push each other
apart less often, so conflicting centres stay close instead of being driven to opposite sides.
Accuracy alone cannot show whether that happens; the trained heads can. For every ``conflict``
run of ``python -m pfc_ds.experiments.robustness`` under ``OUTPUT`` this reads the final head
(memory-mapped shards, any world size) and reports the mean cosine of the planted twin pairs
against that of as many random unrelated pairs, how often a twin is the other's nearest centre,
and the conflict finder's precision and recall at each of ``--thresholds`` against the planted
CSV. Writes ``OUTPUT/twins.json`` and ``twins.md``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfc_ds.checkpoint import head_shard_paths
from pfc_ds.conflicts import find_conflicts, open_bank, precision_recall, read_pairs
from pfc_ds.experiments.report import mean_std


def twin_stats(
    train: Path, planted: set[tuple[int, int]], thresholds: Sequence[float]
) -> dict[str, float]:
    """Cosines of the planted pairs and of random pairs, how often a twin is the other's
    nearest centre, and the finder's precision/recall at each threshold. (The nearest-centre
    rate forms the whole C x C matrix: for these 2k-class heads only; the finder is blockwise.)"""
    shards = head_shard_paths(train)
    bank = open_bank(shards)
    w = torch.nn.functional.normalize(torch.cat([x.float() for x in bank.weights]), dim=1)
    a, b = (torch.tensor(c) for c in zip(*sorted(planted), strict=True))
    twins = (w[a] * w[b]).sum(1)
    rng = np.random.default_rng(0)
    ra = torch.from_numpy(rng.integers(0, len(w), 4 * len(a)))
    rb = torch.from_numpy(rng.integers(0, len(w), 4 * len(a)))
    keep = [
        i
        for i, (x, y) in enumerate(zip(ra.tolist(), rb.tolist(), strict=True))
        if x != y and (min(x, y), max(x, y)) not in planted
    ][: len(a)]
    others = (w[ra[keep]] * w[rb[keep]]).sum(1)
    cos = w @ w.T
    cos.fill_diagonal_(-2.0)
    nearest = cos.argmax(1)
    top1 = ((nearest[a] == b) | (nearest[b] == a)).float().mean()
    out = {
        "twin_cos": float(twins.mean()),
        "twin_cos_below_0": float((twins < 0).float().mean()),
        "random_cos": float(others.mean()),
        "twin_nearest": float(top1),
    }
    for t in thresholds:
        found = find_conflicts(shards, t)
        precision, recall, _ = precision_recall([(x, y) for x, y, _ in found], planted)
        out[f"found@{t:g}"] = len(found)
        out[f"precision@{t:g}"] = 0.0 if not found else precision
        out[f"recall@{t:g}"] = recall
    return out


def collect(output: Path, thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """One record per finished conflict run under ``output``."""
    records = []
    for done in sorted((output / "runs").glob("conflict-*/r*/seed*/result.json")):
        result = json.loads(done.read_text())
        planted = read_pairs(output / "data" / done.parts[-4] / "train_conflicts.csv")
        stats = twin_stats(Path(result["output"]), planted, thresholds)
        records.append({"noise": result["noise"], "rate": result["rate"],
                        "seed": result["seed"], **stats})  # fmt: skip
    if not records:
        raise FileNotFoundError(f"{output}: no finished conflict runs (runs/conflict-*/...)")
    return records


def table(records: Sequence[dict[str, Any]], thresholds: Sequence[float]) -> str:
    """Mean ± std over seeds per (noise, rate)."""
    keys = ["twin_cos", "random_cos", "twin_cos_below_0", "twin_nearest"]
    head = ["twin cosine", "random-pair cosine", "twins below 0", "twin is nearest"]
    for t in thresholds:
        keys += [f"precision@{t:g}", f"recall@{t:g}"]
        head += [f"precision @ {t:g}", f"recall @ {t:g}"]
    lines = [
        "| noise | r | seeds | " + " | ".join(head) + " |",
        "|---|---|---|" + "---|" * len(head),
    ]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["noise"], r["rate"]), []).append(r)
    for (noise, rate), rs in sorted(groups.items(), key=lambda g: (g[0][0], -g[0][1])):
        cells = []
        for k in keys:
            m, s = mean_std([r[k] for r in rs])
            cells.append(f"{m:.3f} ± {s:.3f}")
        lines.append(f"| {noise} | {rate:g} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pfc_ds.experiments.twins", description=__doc__)
    p.add_argument("output", type=Path, help="the robustness experiment's --output folder")
    p.add_argument("--thresholds", default="0.7,0.9", help="the finder's, comma-separated")
    a = p.parse_args(argv)
    thresholds = [float(t) for t in a.thresholds.split(",")]
    records = collect(a.output, thresholds)
    text = table(records, thresholds)
    (a.output / "twins.json").write_text(json.dumps(records, indent=1) + "\n")
    (a.output / "twins.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
