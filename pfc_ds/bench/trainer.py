"""Trainer throughput: the demo config at W=1 and W=2, and (with a GPU) iresnet50 at 1M ids.

    python -m pfc_ds.bench.trainer            # measure, print, rewrite BENCHMARKS.md's trainer section
    python -m pfc_ds.bench.trainer --gpu      # the GPU run: r50, fp16, ZeRO-2, 1M ids, r = 0.1

Every run goes through ``torchrun ... train.py`` exactly as a user would launch it; the numbers
come from the runs' ``metrics.jsonl``: medians of img/s and of the per-step time split over the
logged intervals after the first, which holds start-up costs. On the CPU, W ranks share the machine's cores:
``OMP_NUM_THREADS = cores / W``, so both rows use the whole machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pfc_ds.bench.sections import write_section

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("data", "backbone", "head", "optimizer")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    world: int, config: str, ds: str, out: Path, steps: int, extra: list[str], *, cpu: bool
) -> list[dict]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    if cpu:  # the CPU table on a GPU machine too: W ranks on one GPU would ask for cuda:1
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
        "--master_port", str(_port()), "train.py", "--config", config,
        "--deepspeed_config", ds, "--output", str(out), "--max-steps", str(steps),
        "--set", "train.save_every=0", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def summarise(steady: list[dict]) -> dict[str, float]:
    """Medians over logged intervals: a shared machine's bursts of load from other processes
    show up as outliers that a mean would report."""
    out = {"img_per_s": _median([r["img_per_s"] for r in steady])}
    for p in PHASES:
        out[p] = 1e3 * _median([r[f"time_{p}"] for r in steady])
    out["mem_gb"] = max((r.get("max_mem_gb") or 0.0) for r in steady)
    return out


def cpu_table(steps: int, rounds: int = 2) -> str:
    records: dict[int, list[dict]] = {1: [], 2: []}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):  # interleaved, so both sizes see the same background load
            for world in (1, 2):
                out = Path(tmp) / f"w{world}_{i}"
                recs = run(world, "configs/demo_cpu.yaml", "ds_configs/cpu.json", out, steps,
                           ["--log-every", "10"], cpu=True)  # fmt: skip
                records[world] += recs[1:]  # the first interval holds start-up costs
    rows = [(world, summarise(recs)) for world, recs in records.items()]
    lines = [
        f"Demo config (`configs/demo_cpu.yaml`: tiny backbone, 56 px synthetic images, 300 ids,"
        f" r = 0.5, fp32, ZeRO-0, batch 64 per rank), {rounds} interleaved runs of {steps} steps"
        f" per row, medians over 10-step intervals, launched with"
        f" torchrun; {os.cpu_count()} cores ({platform.processor() or platform.machine()}),"
        f" OMP_NUM_THREADS = cores / W; 1-min load average before the run {load:.2f}"
        " (the machine is shared, so absolute numbers move with it).",
        "",
        "| W | global batch | img/s | data ms | backbone ms | head ms | optimizer ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for world, s in rows:
        lines.append(
            f"| {world} | {64 * world} | {s['img_per_s']:.0f} | {s['data']:.1f} | "
            f"{s['backbone']:.1f} | {s['head']:.1f} | {s['optimizer']:.1f} |"
        )
    scale = rows[1][1]["img_per_s"] / rows[0][1]["img_per_s"]
    lines += [
        "",
        f"W=2 / W=1 throughput: {scale:.2f}x. Times are per optimizer step on rank 0: backbone"
        " = its forward + backward (incl. the gradient hooks), head = Partial FC forward +"
        " backward (incl. the embedding all-gather and the distributed softmax), optimizer ="
        " stage-0 gradient all-reduce + `engine.step` + `SparseSGD.step`, data = synthetic"
        " batch generation. On 2 cores a second rank adds no compute (W=1 already runs 2"
        " threads) but adds gloo round trips: the head's label and embedding all-gathers, its"
        " three softmax all-reduces and the gradient all-reduce, plus the trainer's overflow and"
        " stop flags, which is why the head's time grows and W=2 is not faster here.",
    ]
    return "\n".join(lines)


def gpu_table(steps: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--set", "data.num_classes=1000000", "--set", "data.num_images=10000000",
                 "--set", "head.sample_rate=0.1", "--set", "train.batch_size=128",
                 "--log-every", "10"]  # fmt: skip
        recs = run(1, "configs/synthetic_3m_pfc01_r50.yaml", "ds_configs/zero2_fp16.json",
                   Path(tmp) / "gpu", steps, extra, cpu=False)  # fmt: skip
    s = summarise(recs[1:])
    return (
        "iresnet50, fp16, ZeRO-2, 1M ids, r = 0.1, batch 128, 1 GPU "
        f"({_gpu_name()}): {s['img_per_s']:.0f} img/s, peak memory {s['mem_gb']:.1f} GB"
    )


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--gpu", action="store_true", help="also run the GPU configuration")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    t0 = time.time()
    parts = [
        "## Trainer (`python -m pfc_ds.bench.trainer`)",
        "",
        "### CPU",
        "",
        cpu_table(args.steps),
        "",
        "### GPU",
        "",
        gpu_table(50) if args.gpu else "not run: no GPU lent to this session.",
    ]
    body = "\n".join(parts)
    print(body)
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)
    if not args.no_write:
        write_section("trainer", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
