"""What a sweep writes: ``scale.json``, a markdown table, the time/memory plot and the fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def fit_per_row(records: list[dict[str, Any]]) -> dict[str, float] | None:
    """Least squares ``step_ms = a + b * sampled_rows`` over the points of one world size.

    Also fits ``a + b * rows + c * num_local``: a step that grew with the shard would show a
    ``c`` comparable to ``b``; ``c / b`` near 0 says the time follows the sampled rows only.
    """
    if len({r["sampled_rows"] for r in records}) < 2:
        return None
    s = np.array([r["sampled_rows"] for r in records], float)
    n = np.array([r["num_local"] for r in records], float)
    t = np.array([r["step_ms"] for r in records], float)
    a1 = np.stack([np.ones_like(s), s], 1)
    (a, b), *_ = np.linalg.lstsq(a1, t, rcond=None)
    resid = t - a1 @ np.array([a, b])
    r2 = 1.0 - float(resid @ resid) / max(float(((t - t.mean()) ** 2).sum()), 1e-30)
    out = {"intercept_ms": float(a), "ms_per_million_rows": float(b) * 1e6, "r2": r2}
    if np.linalg.matrix_rank(np.stack([np.ones_like(s), s, n], 1)) == 3:
        (_, b2, c2), *_ = np.linalg.lstsq(np.stack([np.ones_like(s), s, n], 1), t, rcond=None)
        out["ms_per_million_rows_joint"] = float(b2) * 1e6
        out["ms_per_million_shard_rows_joint"] = float(c2) * 1e6
    return out


def markdown(records: list[dict[str, Any]], fits: dict[int, dict] | None = None) -> str:
    lines = [
        "| ids | r | W | D | dtype | bank | sampled rows/rank | step ms (median, IQR) | build s "
        "| peak MB/rank | bank | opt state | workspace | rest | model MB | model/measured |",
        "|---" * 16 + "|",
    ]
    for r in records:
        lines.append(
            f"| {r['ids']:,} | {r['sample_rate']} | {r['world_size']} | {r['embedding_size']} "
            f"| {r['dtype']} | {r.get('bank', 'device')} | {r['sampled_rows']:,} | {r['step_ms']:.0f} "
            f"({r['step_ms_q1']:.0f}–{r['step_ms_q3']:.0f}) | {r['build_s']:.1f} "
            f"| {r['peak_mem_mb']:.0f} | {r['bank_mb']:.0f} | {r['optimizer_state_mb']:.0f} "
            f"| {r['workspace_mb']:.0f} | {r['rest_mb']:.0f} | {r['predicted_mem_mb']:.0f} "
            f"| {r['predicted_mem_mb'] / r['peak_mem_mb']:.3f} |"
        )
    lanes = [r for r in records if r.get("lane_per_step")]
    if lanes:
        lines += [
            "",
            "Offloaded banks, per step of the busiest rank (the lane thread's time and bytes):",
            "",
            "| ids | bank | gather ms | gathered MB | gather GB/s | write ms | written MB | "
            "write GB/s | bank files or host MB/rank |",
            "|---" * 9 + "|",
        ]
        for r in lanes:
            ln, where = r["lane_per_step"], r.get("placement") or {}
            gb = lambda b, t: b / max(t, 1e-9) / 1e9  # noqa: E731
            lines.append(
                f"| {r['ids']:,} | {r['bank']} | {ln['gather_s'] * 1e3:.0f} | "
                f"{ln['gather_bytes'] / 2**20:.0f} | {gb(ln['gather_bytes'], ln['gather_s']):.2f} | "
                f"{ln['write_s'] * 1e3:.0f} | {ln['write_bytes'] / 2**20:.0f} | "
                f"{gb(ln['write_bytes'], ln['write_s']):.2f} | "
                f"{(where.get('host_mb') or where.get('disk_mb') or 0):.0f} |"
            )
    for w, f in (fits or {}).items():
        if f is None:
            continue
        line = (
            f"\nW={w}: step ms = {f['intercept_ms']:.0f} + {f['ms_per_million_rows']:.0f} x "
            f"(sampled rows per rank / 1e6), R² = {f['r2']:.3f}."
        )
        if "ms_per_million_shard_rows_joint" in f:
            line += (
                f" Fitted jointly with the shard size: {f['ms_per_million_rows_joint']:.0f} ms "
                f"per million sampled rows, {f['ms_per_million_shard_rows_joint']:.1f} ms per "
                "million shard rows."
            )
        lines.append(line)
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Step time and peak memory against ids (log x), one line per (sample rate, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = sorted({(r["sample_rate"], r["world_size"]) for r in records})
    for rate, w in keys:
        rs = sorted(
            (r for r in records if (r["sample_rate"], r["world_size"]) == (rate, w)),
            key=lambda r: r["ids"],
        )
        x = [r["ids"] for r in rs]
        label = f"r={rate}, W={w}"
        ax_t.errorbar(
            x,
            [r["step_ms"] for r in rs],
            yerr=[
                [r["step_ms"] - r["step_ms_q1"] for r in rs],
                [r["step_ms_q3"] - r["step_ms"] for r in rs],
            ],
            marker="o",
            capsize=3,
            label=label,
        )
        (line,) = ax_m.plot(x, [r["peak_mem_mb"] / 1024 for r in rs], marker="o", label=label)
        ax_m.plot(
            x,
            [r["predicted_mem_mb"] / 1024 for r in rs],
            ls="--",
            color=line.get_color(),
            label=f"{label} model",
        )
    for ax, title, unit in (
        (ax_t, "head step time", "ms (median, IQR)"),
        (ax_m, "peak memory per rank", "GiB"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("identities")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    r0 = records[0]
    fig.suptitle(
        f"pfc_ds.scale: D={r0['embedding_size']}, {r0['dtype']} centres, batch "
        f"{r0['batch_size']}/rank, {r0['device']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, records: list[dict[str, Any]], budget: dict[str, Any] | None = None) -> str:
    """Write ``scale.json`` (the list of records), ``fits.json``, ``scale.md`` and
    ``scale.png``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    sweep = [r for r in records if r.get("kind", "sweep") == "sweep"] or records
    fits = {
        w: fit_per_row([r for r in sweep if r["world_size"] == w])
        for w in sorted({r["world_size"] for r in sweep})
    }
    (out / "scale.json").write_text(json.dumps(records, indent=1))
    (out / "fits.json").write_text(json.dumps(fits, indent=1))
    md = markdown(records, fits)
    if budget is not None:
        md += (
            f"\n\n`--budget-gb {budget['budget_gb']}`: max_ids = {budget['max_ids']:,} measured "
            f"(model: {budget['model_max_ids']:,}) at r={budget['sample_rate']}, "
            f"W={budget['world_size']}, over {budget['runs']} runs."
        )
    (out / "scale.md").write_text(md + "\n")
    plot(sweep, out / "scale.png")
    return md
