"""Summaries of experiment runs: mean ± std over seeds, a markdown table and a plot.

A run is a dict with at least ``noise``, ``rate``, ``seed``, ``accuracy`` and ``tar_at_far``
(what ``pfc_ds.experiments.robustness`` writes to ``results.json``). Nothing here trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (noise, rate) in first-seen noise order and decreasing rate: ``n`` seeds,
    ``accuracy`` and ``tar_at_far`` mean and std."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["noise"], float(run["rate"])), []).append(run)
    noises = list(dict.fromkeys(run["noise"] for run in runs))
    rows = []
    for noise, rate in sorted(groups, key=lambda k: (noises.index(k[0]), -k[1])):
        group = groups[(noise, rate)]
        acc, acc_std = mean_std([r["accuracy"] for r in group])
        tar, tar_std = mean_std([r["tar_at_far"] for r in group])
        rows.append(
            {
                "noise": noise,
                "rate": rate,
                "n": len(group),
                "accuracy": acc,
                "accuracy_std": acc_std,
                "tar_at_far": tar,
                "tar_at_far_std": tar_std,
            }
        )
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], *, metric: str = "accuracy") -> str:
    """Noise types down, sample rates across (decreasing), cells ``mean ± std (n)``."""
    rates = sorted({r["rate"] for r in rows}, reverse=True)
    noises = list(dict.fromkeys(r["noise"] for r in rows))
    cell = {(r["noise"], r["rate"]): r for r in rows}
    lines = [
        "| noise | " + " | ".join(f"r = {rate:g}" for rate in rates) + " |",
        "|---|" + "---:|" * len(rates),
    ]
    for noise in noises:
        cells = []
        for rate in rates:
            r = cell.get((noise, rate))
            if r is None:
                cells.append("–")
            else:
                n = f" (n={r['n']})" if r["n"] != max(x["n"] for x in rows) else ""
                cells.append(f"{r[metric]:.4f} ± {r[metric + '_std']:.4f}{n}")
        lines.append(f"| {noise} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Held-out accuracy against sample rate (log axis), one line per noise type, error bars
    of one standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for noise in dict.fromkeys(r["noise"] for r in rows):
        mine = sorted((r for r in rows if r["noise"] == noise), key=lambda r: r["rate"])
        ax.errorbar(
            [r["rate"] for r in mine],
            [r["accuracy"] for r in mine],
            yerr=[r["accuracy_std"] for r in mine],
            marker="o",
            capsize=4,
            label=noise,
        )
    rates = sorted({r["rate"] for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.minorticks_off()
    ax.set_xlabel("Partial FC sample rate r")
    ax.set_ylabel("held-out verification accuracy")
    ax.set_title(title or "Accuracy vs sample rate (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
