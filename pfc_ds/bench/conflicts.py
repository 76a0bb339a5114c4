"""Time and memory of the centre-conflict finder against its floor, and a 10M-id model.

    python -m pfc_ds.bench.conflicts [--sizes 200000x128,100000x512] [--write docs/conflicts_section.md]

For each size it writes a random fp16 bank as 2 head shards (with planted near-duplicates),
scans it offline and measures, in the same run, the fp32 GEMM rate of one ``B x D x B`` tile.
The floor is the scan's GEMM FLOPs (``C^2 D``: the ``i <= j`` tiles) over that rate; the ratio
says what blocking, normalisation, thresholding and I/O add. Memory is the peak anonymous RSS
sampled during the scan (the mapped shard pages are file-backed page cache, not counted). The
10M-id rows are a model: FLOPs over the measured rate (CPU) or an assumed GPU rate.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch

from pfc_ds.checkpoint.shard_files import save_shard, shard_name
from pfc_ds.conflicts import open_bank
from pfc_ds.conflicts.scan import DEFAULT_BLOCK_ROWS, open_weights, scan, workspace_bytes
from pfc_ds.head.sharding import shard_range

GPU_FP32 = 50e12  # assumed sustained fp32 (no TF32) GEMM rate of an H100/H200-class GPU
GPU_H2D = 50e9  # assumed host-to-device bytes/s (PCIe 5)


def gemm_rate(block: int, dim: int, seconds: float = 3.0) -> float:
    """Sustained fp32 FLOP/s of ``torch.mm`` on one tile shape, as the scan runs it."""
    a, b = torch.randn(block, dim), torch.randn(block, dim)
    out = torch.empty(block, block)
    torch.mm(a, b.T, out=out)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b.T, out=out)
        n += 1
    return 2 * block * block * dim * n / (time.perf_counter() - t0)


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Peak anonymous RSS above the level at entry, sampled every 20 ms."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = _rss_anon()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_anon())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_anon())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def write_bank(folder: Path, ids: int, dim: int, world: int, planted: int) -> None:
    """A random fp16 bank in ``world`` shards, rows ``ids - planted ...`` copying earlier ones."""
    g = torch.Generator().manual_seed(0)
    for rank in range(world):
        start, num = shard_range(ids, world, rank)
        w = torch.randn(num, dim, generator=g)
        meta = {
            "num_classes": ids,
            "embedding_size": dim,
            "world_size": world,
            "rank": rank,
            "class_start": start,
            "num_local": num,
        }
        save_shard({"weight": w.half(), "meta": meta}, folder / shard_name(rank, world))
    if planted:  # the last shard's tail duplicates the first shard's head, with noise
        last = folder / shard_name(world - 1, world)
        raw = last.with_name(last.name + ".weight.bin")
        first = open_bank([folder / shard_name(r, world) for r in range(world)]).weights[0]
        dup = first[:planted].float() + 0.3 * torch.randn(planted, dim, generator=g)
        with open(raw, "r+b") as f:
            f.seek((num - planted) * dim * 2)
            f.write(dup.half().numpy().tobytes())


def measure(ids: int, dim: int, block: int, world: int, threshold: float) -> dict:
    rate = gemm_rate(block, dim)
    with tempfile.TemporaryDirectory() as tmp:
        write_bank(Path(tmp), ids, dim, world, planted=100)
        bank = open_bank(sorted(Path(tmp).glob("head_shard_*.pt")))
        scan(open_weights([bank.weights[0][:block]]), threshold, block_rows=block, device="cpu")
        with PeakRss() as rss:
            t0 = time.perf_counter()
            res = scan(bank, threshold, block_rows=block, device="cpu")
            seconds = time.perf_counter() - t0
    flops = res.stats["gemm_flops"]
    return {
        "ids": ids,
        "dim": dim,
        "block": block,
        "pairs": len(res.a),
        "seconds": seconds,
        "gemm_rate": rate,
        "floor_s": flops / rate,
        "ratio": seconds / (flops / rate),
        "gemm_share": res.stats["gemm_seconds"] / seconds,
        "rss_mb": rss.extra / 2**20,
        "workspace_mb": res.stats["workspace_bytes"] / 2**20,
        "bank_mb": ids * dim * 2 / 2**20,
    }


def model_10m(row: dict, ids: int = 10_000_000, gpu_block: int = 16384) -> dict:
    """Scale a measured row to ``ids`` classes at the same D: CPU from its rate and overhead,
    GPU from the assumed rates (GEMM plus the right blocks streamed over the host link)."""
    flops = ids * ids * row["dim"]
    cpu = flops / row["gemm_rate"] * row["ratio"]
    io = ids * ids * row["dim"] * 2 / (2 * gpu_block)  # fp16 bytes: one j block per tile
    return {
        "dim": row["dim"],
        "flops": flops,
        "cpu_s": cpu,
        "gpu_gemm_s": flops / GPU_FP32,
        "gpu_io_s": io / GPU_H2D,
        "cpu_ws_mb": workspace_bytes(row["block"], row["dim"]) / 2**20,
        "gpu_ws_mb": workspace_bytes(gpu_block, row["dim"]) / 2**20,
        "bank_gb": ids * row["dim"] * 2 / 1e9,
    }


def _t(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s:.0f} s"


def render(rows: list[dict], cmd: str, threads: int) -> str:
    out = [
        "## Centre-conflict finder: time and memory",
        "",
        f"`{cmd}` ({torch.get_num_threads()} torch threads, {threads} cores, shared machine; "
        "random fp16 banks in 2 shards, threshold 0.7, one process, CPU).",
        "",
        "| ids | D | block B | pairs found | scan s | GEMM rate (GFLOP/s) | floor s (C²D / rate) "
        "| ratio | GEMM share of scan | peak extra RSS (MB) | workspace B²·4 + 2BD·4 (MB) | bank (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['ids']:,} | {r['dim']} | {r['block']} | {r['pairs']} | {r['seconds']:.1f} "
            f"| {r['gemm_rate'] / 1e9:.1f} | {r['floor_s']:.1f} | {r['ratio']:.2f} "
            f"| {r['gemm_share']:.0%} "
            f"| {r['rss_mb']:.0f} | {r['workspace_mb']:.0f} | {r['bank_mb']:.0f} |"
        )
    out += [
        "",
        "**Model for a 10M-id bank** (not measured): FLOPs = C²·D (the tiles `i <= j`); CPU time "
        "= FLOPs / the GEMM rate measured above x the measured ratio; GPU time = FLOPs / "
        f"{GPU_FP32 / 1e12:.0f} TFLOP/s (assumed sustained fp32) plus streaming one fp16 "
        f"`B x D` block per tile over a {GPU_H2D / 1e9:.0f} GB/s host link at B = 16384. "
        "Memory is the workspace (the score block and two row blocks) plus the pairs kept; the "
        "bank is memory-mapped page cache, never resident as a copy. W ranks "
        "(`torchrun ... -m pfc_ds.tools.find_conflicts`) split the tiles: time / W.",
        "",
        "| D | bank fp16 | FLOPs | CPU (this machine) | CPU workspace | GPU GEMM | GPU I/O "
        "| GPU workspace |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = model_10m(r)
        out.append(
            f"| {m['dim']} | {m['bank_gb']:.1f} GB | {m['flops']:.2e} | {_t(m['cpu_s'])} "
            f"| {m['cpu_ws_mb']:.0f} MB | {_t(m['gpu_gemm_s'])} | {_t(m['gpu_io_s'])} "
            f"| {m['gpu_ws_mb'] / 1024:.1f} GB |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    import os
    import sys

    p = argparse.ArgumentParser(
        prog="python -m pfc_ds.bench.conflicts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sizes", default="200000x128,100000x512", help="IDSxDIM,...")
    p.add_argument("--block-rows", type=int, default=DEFAULT_BLOCK_ROWS)
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--write", help="markdown file to write")
    args = p.parse_args(argv)
    rows = []
    for size in args.sizes.split(","):
        ids, dim = (int(x) for x in size.split("x"))
        rows.append(measure(ids, dim, args.block_rows, 2, args.threshold))
        print(rows[-1], flush=True)
    text = render(
        rows, "python -m pfc_ds.bench.conflicts " + " ".join(sys.argv[1:]), os.cpu_count() or 0
    )
    print(text)
    if args.write:
        Path(args.write).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
