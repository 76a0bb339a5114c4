"""Head peak memory against the global batch: what stops a head from scaling with N.

    python -m pfc_ds.bench.memory [--batches 128,256,...,8192] [--before SRC] [--write]

Each point is one head step (forward, backward, ``SparseSGD.step``) in a fresh process at
C = 1M ids, D = 512, r = 0.1, fp16 centres, so its peak RSS is its own. ``--before SRC`` runs the
same worker against another checkout's ``pfc_ds`` (e.g. a ``git worktree`` of an older commit)
in the same run, for a before/after table. The reference unit is one ``N x S`` fp32 buffer, the
logits a head that materialises them holds at least once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def worker(batch: int, classes: int, dim: int, rate: float) -> dict:
    import torch

    import pfc_ds

    torch.manual_seed(0)
    margin = pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4)
    head = pfc_ds.PartialFC(margin, dim, classes, sample_rate=rate, dtype=torch.float16)
    opt = pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    emb = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(0, classes, (batch,))
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    t0 = time.perf_counter()
    head(emb, labels).backward()
    opt.step()
    opt.zero_grad()
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "built_rss_mb": built,
        "step_s": time.perf_counter() - t0,
    }


def run(src: str | None, batch: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(batch)]
    cmd += ["--classes", str(args.classes), "--dim", str(args.dim), "--rate", str(args.rate)]
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(args, rows: list[dict], before: bool) -> str:
    s = int(args.rate * args.classes)
    unit = lambda n: n * s * 4 / 2**20  # noqa: E731 - MB of one N x S fp32 buffer
    lines = [
        f"C={args.classes:,}, D={args.dim}, r={args.rate} (S={s:,} sampled rows), fp16 centres, "
        "one head step per fresh process, one process, this CPU. Growth is peak RSS minus the "
        f"N={rows[0]['batch']} point, in MB and in units of one N x S fp32 buffer. Measured "
        f"{time.strftime('%Y-%m-%d')}. Command: `python -m pfc_ds.bench.memory"
        + (" --before <worktree of the previous commit>" if before else "")
        + " --write`.",
        "",
    ]
    head = "| N | N x S fp32 MB | after: peak MB | after: growth (x N x S) |"
    sep = "|---|---|---|---|"
    if before:
        head += " before: peak MB | before: growth (x N x S) |"
        sep += "---|---|"
    lines += [head, sep]
    a0 = rows[0]["after"]["peak_rss_mb"]
    b0 = rows[0]["before"]["peak_rss_mb"] if before else 0.0
    for r in rows:
        n, a = r["batch"], r["after"]["peak_rss_mb"]
        line = f"| {n:,} | {unit(n):,.0f} | {a:,.0f} | {a - a0:+,.0f} ({(a - a0) / unit(n):.2f}) |"
        if before:
            b = r["before"]["peak_rss_mb"]
            line += f" {b:,.0f} | {b - b0:+,.0f} ({(b - b0) / unit(n):.2f}) |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batches", default="128,256,512,1024,2048,4096,8192")
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--before", help="another checkout whose pfc_ds to measure alongside")
    p.add_argument(
        "--write", action="store_true", help="rewrite the memory section of BENCHMARKS.md"
    )
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.classes, args.dim, args.rate)))
        return
    here = str(Path(__file__).resolve().parents[2])
    rows = []
    for n in (int(x) for x in args.batches.split(",")):
        row = {"batch": n, "after": run(here, n, args)}
        if args.before:
            row["before"] = run(args.before, n, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    body = render(args, rows, bool(args.before))
    print(body)
    if args.write:
        from pfc_ds.bench.sections import write_section

        write_section("memory", "## Head memory against the global batch\n\n" + body)


if __name__ == "__main__":
    main()
