"""Head step cost, side by side in one run: pfc_ds against dense baselines and the hardware floor.

    python -m pfc_ds.bench.head [--classes 1000000] [--sweep 100000,300000,1000000,2000000] [--write]

Every variant runs in its own fresh process so its peak RSS is its own. Variants:

* ``pfc_fp32`` / ``pfc_fp16``: pfc_ds PartialFC + SparseSGD, centres (and momentum) in that dtype;
* ``dense_pfc``: insightface-v2-style Partial FC: ``weight[index]`` on a dense fp32 Parameter and
  ``torch.optim.SGD`` (dense gradient, dense momentum, passive updates of unsampled rows);
* ``dense_fc``: the plain model-parallel FC at one rank: every class, dense Parameter + SGD.

The floor is the step's GEMM FLOPs over a GEMM rate measured on the same shapes (into
preallocated outputs, as the head's), plus the bytes the sampled rows must move (read and write
weight and momentum) over a measured bandwidth, given two ways: a streaming copy of buffers
larger than the last-level cache, and the bank's own access, a gather and a scatter of a fresh
random set of ``S`` rows of a ``C``-row fp32 bank at each repetition.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pfc_ds
from pfc_ds.bench.sections import write_section

VARIANTS = ("pfc_fp32", "pfc_fp16", "dense_pfc", "dense_fc")
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timeit(fn, steps: int, warmup: int, device: str = "cpu") -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_mb(device: str) -> float:
    """Peak allocated device memory on a GPU, peak RSS on a CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_rss_mb()


def _inputs(args):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(args.batch, args.dim, generator=g).to(args.device).requires_grad_(True)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(args.device)
    return emb, labels


def _pfc_step(args, dtype):
    import pfc_ds

    margin = pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4)
    # On a GPU the GEMMs run in the storage dtype (the trainer's gemm_dtype: auto under fp16).
    gemm = dtype if args.device.startswith("cuda") and dtype != torch.float32 else None
    head = pfc_ds.PartialFC(
        margin,
        args.dim,
        args.classes,
        sample_rate=args.rate,
        dtype=dtype,
        device=args.device,
        gemm_dtype=gemm,
        even_batches=True,
    )
    opt = pfc_ds.SparseSGD(head, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    emb, labels = _inputs(args)

    def step():
        head(emb, labels).backward()
        opt.step()
        opt.zero_grad()
        emb.grad = None

    return step


def _dense_step(args, rate):
    """insightface v2 PartialFC style: index a dense Parameter, let autograd build a dense grad."""
    from pfc_ds.head.margins import CombinedMarginLoss
    from pfc_ds.head.sampler import ClassSampler

    margin = CombinedMarginLoss(64.0, 1.0, 0.0, 0.4)
    weight = torch.nn.Parameter(torch.normal(0, 0.01, (args.classes, args.dim)).to(args.device))
    opt = torch.optim.SGD([weight], lr=LR, momentum=MOMENTUM, weight_decay=WD)
    sampler = ClassSampler(args.classes, rate, 0, 0)
    emb, labels = _inputs(args)

    def step():
        index, _ = sampler.sample(labels)
        target = sampler.targets(index, labels)
        sub = weight[index] if rate < 1.0 else weight
        logits = F.linear(F.normalize(emb), F.normalize(sub)).clamp(-1, 1)
        F.cross_entropy(margin(logits, target), target).backward()
        opt.step()
        opt.zero_grad()
        emb.grad = None

    return step


def _last_level_cache_bytes() -> int:
    """The largest CPU cache sysfs reports (0 if none): the floor's buffers must exceed it, or
    they measure the cache instead of memory (this machine reports a 480 MB L3)."""
    best = 0
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = Path(f).read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        with contextlib.suppress(ValueError):
            best = max(best, int(text.rstrip("KMG")) * scale)
    return best


def _floor(args) -> dict:
    """GEMM rate on the step's three GEMM shapes and memory bandwidths, measured now, each the
    way the head works: GEMMs into preallocated outputs (the head's workspace; a fresh output
    costs page faults a CPU GEMM does not need), a copy of buffers larger than the last-level
    cache, and a gather plus scatter of a fresh random set of ``S`` rows of a ``C``-row bank at
    every repetition (repeating one set would find its rows in the cache)."""
    s, dev = int(args.rate * args.classes), args.device
    # A GPU's GEMMs run in fp16 (as the pfc_fp16 variant's), a CPU's in fp32.
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    a = torch.randn(args.batch, args.dim, device=dev, dtype=dtype)
    w = torch.randn(s, args.dim, device=dev, dtype=dtype)
    g = torch.randn(args.batch, s, device=dev, dtype=dtype)
    outs = [torch.empty(args.batch, s, device=dev, dtype=dtype),
            torch.empty(args.batch, args.dim, device=dev, dtype=dtype),
            torch.empty(s, args.dim, device=dev, dtype=dtype)]  # fmt: skip

    def gemms():
        torch.mm(a, w.t(), out=outs[0])  # logits
        torch.mm(g, w, out=outs[1])  # dL/demb
        torch.mm(g.t(), a, out=outs[2])  # dL/drows

    t = _timeit(gemms, args.steps, 2, dev)
    flops = 3 * 2 * args.batch * args.dim * s
    a = w = g = outs = None
    size = max(256 << 20, 2 * _last_level_cache_bytes()) if dev == "cpu" else 256 << 20
    src = torch.randn(size // 4, device=dev)
    dst = torch.empty_like(src)
    tc = _timeit(lambda: dst.copy_(src), args.steps, 2, dev)
    src = dst = None  # free the copy's buffers before the bank
    bank = torch.empty(args.classes, args.dim, device=dev).normal_()
    sets = [torch.randperm(args.classes, device=dev)[:s].sort().values
            for _ in range(args.steps + 2)]  # fmt: skip
    out = torch.empty(s, args.dim, device=dev)

    def gather_scatter():
        rows = sets.pop()
        torch.index_select(bank, 0, rows, out=out)
        bank.index_copy_(0, rows, out)

    tr = _timeit(gather_scatter, args.steps, 2, dev)
    return {
        "gemm_flops": flops,
        "gemm_rate": flops / t,
        "bandwidth": 2 * size / tc,
        "row_bandwidth": 4 * s * args.dim * 4 / tr,  # read + write of each, as the copy's
    }


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = _peak_rss_mb()
    if args.worker == "floor":
        return _floor(args)
    if args.worker.startswith("pfc_"):
        step = _pfc_step(args, torch.float32 if args.worker == "pfc_fp32" else torch.float16)
    else:
        step = _dense_step(args, args.rate if args.worker == "dense_pfc" else 1.0)
    t = _timeit(step, args.steps, args.warmup, args.device)
    return {
        "step_s": t,
        "peak_rss_mb": _peak_mb(args.device),
        "import_rss_mb": base,
        "source": os.path.realpath(pfc_ds.__file__),  # which tree's head ran (--before)
    }


BEFORE = " (before)"  # a variant run from the --before tree's code


def run_variant(args, variant: str, classes: int) -> dict:
    worker = variant.removesuffix(BEFORE)
    # This file as a script: its own directory, not the cwd, heads the path, so PYTHONPATH
    # decides which tree's pfc_ds it imports (``-m`` would put the cwd's first).
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker]
    cmd += ["--classes", str(classes)]
    for k in ("dim", "batch", "rate", "steps", "warmup", "threads", "device"):
        cmd += [f"--{k}", str(getattr(args, k))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    tree = os.path.realpath(args.before) if variant.endswith(BEFORE) else None
    if tree:  # that tree's pfc_ds first on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if tree and not res["source"].startswith(tree + os.sep):
        raise RuntimeError(f"{variant} imported {res['source']}, not the tree {tree}")
    return res


def floor_seconds(
    floor: dict, classes: int, args, storage_bytes: int, bandwidth: str = "bandwidth"
) -> float:
    """GEMM time plus the rows' bytes (read + write, weight + momentum) over ``bandwidth``:
    the streaming copy's, or ``row_bandwidth``, the bank's sampled-row gather and scatter."""
    s = int(args.rate * classes)
    row_bytes = 2 * s * args.dim * 2 * storage_bytes
    return floor["gemm_flops"] / floor["gemm_rate"] + row_bytes / floor[bandwidth]


def measure(args, classes: int, variants, repeats: int = 1) -> dict:
    """Variants in interleaved rounds; each keeps its fastest round (load only ever slows)."""
    res: dict = {"classes": classes}
    floors = [run_variant(args, "floor", classes)]
    for _ in range(repeats):
        for v in variants:
            r = run_variant(args, v, classes)
            print(
                f"  C={classes:>9,} {v:19s} {r['step_s'] * 1e3:9.1f} ms  "
                f"peak RSS {r['peak_rss_mb']:8.0f} MB",
                flush=True,
            )
            if v not in res or r["step_s"] < res[v]["step_s"]:
                res[v] = r
            if v == "dense_fc":  # minutes per round at 1M: one is enough
                variants = [x for x in variants if x != "dense_fc"]
    floors.append(run_variant(args, "floor", classes))
    # The floor is a best case too: the fastest GEMM and copy seen in the run.
    floor = {k: max(f[k] for f in floors) if k != "gemm_flops" else floors[0][k] for k in floors[0]}
    res["floor"] = floor
    res["floor_fp32_s"] = floor_seconds(floor, classes, args, 4)
    res["floor_fp16_s"] = floor_seconds(floor, classes, args, 2)
    res["rows_floor_fp32_s"] = floor_seconds(floor, classes, args, 4, "row_bandwidth")
    res["rows_floor_fp16_s"] = floor_seconds(floor, classes, args, 2, "row_bandwidth")
    return res


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def render(args, main: dict, sweep: list[dict]) -> str:
    f = main["floor"]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"device {_device_name(args.device)} (peak MB: {'GPU max allocated' if args.device.startswith('cuda') else 'RSS'}), "
        f"{args.threads} threads, one process. D={args.dim}, B={args.batch}, r={args.rate}, "
        f"CosFace s=64 m=0.4, SGD momentum {MOMENTUM}, wd {WD}. Median of {args.steps} steps "
        f"after {args.warmup} warm-up, each variant in a fresh process; at the main point the "
        f"fastest of {args.repeats} interleaved rounds. Measured {time.strftime('%Y-%m-%d')}. "
        f"Command: `python -m pfc_ds.bench.head{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`.",
        "",
        f"Floor at C={main['classes']:,}: GEMM {f['gemm_rate'] / 1e9:.0f} GFLOP/s over "
        f"{f['gemm_flops'] / 1e9:.1f} GFLOP, copy bandwidth {f['bandwidth'] / 1e9:.1f} GB/s "
        f"(read + write) → {main['floor_fp32_s'] * 1e3:.0f} ms (fp32 rows), "
        f"{main['floor_fp16_s'] * 1e3:.0f} ms (fp16 rows). With the bank's own access (gather "
        f"and scatter of the sampled rows, {f['row_bandwidth'] / 1e9:.1f} GB/s read + write): "
        f"{main['rows_floor_fp32_s'] * 1e3:.0f} ms (fp32 rows), "
        f"{main['rows_floor_fp16_s'] * 1e3:.0f} ms (fp16 rows).",
        "",
        "| variant | step ms | peak RSS MB | step / dense_pfc | step / floor | step / row floor "
        "| RSS / dense_pfc |",
        "|---|---|---|---|---|---|---|",
    ]
    base = main["dense_pfc"]
    for v in [name + tag for name in VARIANTS for tag in ("", BEFORE)]:
        if v not in main:
            continue
        r = main[v]
        half = v.startswith("pfc_fp16")
        fl = main["floor_fp16_s"] if half else main["floor_fp32_s"]
        rfl = main["rows_floor_fp16_s"] if half else main["rows_floor_fp32_s"]
        lines.append(
            f"| {v} | {r['step_s'] * 1e3:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['step_s'] / base['step_s']:.3f} | {r['step_s'] / fl:.2f} | "
            f"{r['step_s'] / rfl:.2f} | "
            f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"Peak RSS of a process that has only imported torch: {base['import_rss_mb']:.0f} MB."
    )
    if sweep:
        cols = [v for v in VARIANTS if all(v in r for r in sweep)]
        lines += [
            "",
            "Sweep over C (step ms / peak RSS MB; floor measured alongside each row):",
            "",
            "| C | " + " | ".join(cols) + " | floor fp32 ms | pfc_fp16 / dense_pfc |",
            "|---" * (len(cols) + 3) + "|",
        ]
        for r in sweep:
            cells = [f"{r[v]['step_s'] * 1e3:.0f} / {r[v]['peak_rss_mb']:.0f}" for v in cols]
            ratio = r["pfc_fp16"]["step_s"] / r["dense_pfc"]["step_s"]
            lines.append(
                f"| {r['classes']:,} | "
                + " | ".join(cells)
                + f" | {r['floor_fp32_s'] * 1e3:.0f} | {ratio:.3f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds at the main point")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda: peak memory is the GPU's max allocated, not RSS",
    )
    p.add_argument("--sweep", default="", help="comma-separated class counts, e.g. 100000,2000000")
    p.add_argument("--sweep-dense-fc", action="store_true", help="include dense_fc in the sweep")
    p.add_argument("--skip-dense-fc", action="store_true")
    p.add_argument(
        "--before",
        default="",
        help="a checkout (e.g. a git worktree of an earlier commit): its pfc variants run in "
        "the same rounds, as 'pfc_fp32 (before)'",
    )
    p.add_argument("--write", action="store_true", help="rewrite the head section of BENCHMARKS.md")
    p.add_argument("--worker", choices=(*VARIANTS, "floor"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    variants = [v for v in VARIANTS if not (args.skip_dense_fc and v == "dense_fc")]
    if args.before:
        variants += [v + BEFORE for v in VARIANTS if v.startswith("pfc_")]
    print(f"main point C={args.classes:,}", flush=True)
    main_res = measure(args, args.classes, variants, repeats=args.repeats)
    sweep = []
    for c in [int(x) for x in args.sweep.split(",") if x]:
        print(f"sweep C={c:,}", flush=True)
        vs = [v for v in VARIANTS if v != "dense_fc" or args.sweep_dense_fc]
        sweep.append(
            main_res if c == args.classes and len(vs) <= len(variants) else measure(args, c, vs)
        )
    table = render(args, main_res, sweep)
    print()
    print(table)
    if args.write:
        section = "head_gpu" if args.device.startswith("cuda") else "head"
        write_section(section, table)


if __name__ == "__main__":
    main()
