"""Head memory under gradient accumulation: peak memory after K micro-batches per step.

    python -m pfc_ds.bench.accumulation [--classes 1000000] [--micro 1,2,4,12] [--write]

One ``PartialFC`` + ``SparseSGD`` (fp32 storage, D=512, r=0.1, micro-batch 64 by default) runs
three optimizer steps of K micro-batches each, as the trainer drives it: the window's labels
go to ``prefetch`` first, then K forwards and backwards, then one step. Each K runs in a fresh
process, so its peak (RSS on a CPU, max allocated on a GPU) is its own. The result is the peak
above K=1's, in units of one ``S x D`` fp32 buffer: K micro-batches share one sample, one row
buffer and one row gradient, so it should stay near 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch


def worker(args) -> dict:
    import pfc_ds

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    head = pfc_ds.PartialFC(
        pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4), args.dim, args.classes,
        sample_rate=args.rate, dtype=torch.float32, device=device, even_batches=True,
    )  # fmt: skip
    opt = pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        batches = [
            (
                torch.randn(args.batch, args.dim, generator=g).to(device).requires_grad_(True),
                torch.randint(0, args.classes, (args.batch,), generator=g).to(device),
            )
            for _ in range(args.micro)
        ]
        head.prefetch([labels for _, labels in batches])
        for emb, labels in batches:
            (head(emb, labels) / args.micro).backward()
        opt.step()
        opt.zero_grad()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    sampled = head.sampler.size(args.batch * args.micro)
    return {"micro": args.micro, "peak_mb": peak, "sampled": sampled}


def run(args, micro: int) -> dict:
    cmd = [sys.executable, "-m", "pfc_ds.bench.accumulation", "--worker", "--micro", str(micro)]
    for k in ("classes", "dim", "batch", "rate", "steps", "threads", "device"):
        cmd += [f"--{k}", str(getattr(args, k))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(args, rows: list[dict]) -> str:
    buf_mb = rows[0]["sampled"] * args.dim * 4 / 2**20
    base = rows[0]["peak_mb"]
    peak = "GPU max allocated" if args.device.startswith("cuda") else "peak RSS"
    lines = [
        f"`python -m pfc_ds.bench.accumulation{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`"
        f" on {platform.machine()}, {os.cpu_count()} cores, device {args.device}, "
        f"{time.strftime('%Y-%m-%d')}: {args.classes:,} ids, D={args.dim}, r={args.rate}, fp32 "
        f"storage, SparseSGD, micro-batch {args.batch}, {args.steps} steps, one process per row."
        f" One S x D fp32 buffer (S = {rows[0]['sampled']:,}) is {buf_mb:.0f} MB.",
        "",
        f"| micro-batches per step | {peak} MB | above 1 micro-batch MB | in S x D buffers |",
        "|---|---|---|---|",
    ]
    for r in rows:
        above = r["peak_mb"] - base
        lines.append(
            f"| {r['micro']} | {r['peak_mb']:.0f} | {above:+.0f} | {above / buf_mb:+.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro", default="1,2,4,12", help="micro-batches per step, comma-separated")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--write", action="store_true", help="rewrite BENCHMARKS.md's section")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.micro = int(args.micro)
        print(json.dumps(worker(args)))
        return
    rows = []
    for micro in (int(m) for m in args.micro.split(",")):
        rows.append(run(args, micro))
        print(f"  {micro:3d} micro-batches: peak {rows[-1]['peak_mb']:.0f} MB", flush=True)
    table = render(args, rows)
    print()
    print(table)
    if args.write:
        from pfc_ds.bench.sections import write_section

        section = "accumulation_gpu" if args.device.startswith("cuda") else "accumulation"
        write_section(section, table)


if __name__ == "__main__":
    main()
