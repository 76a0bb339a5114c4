"""Loader throughput: ``python -m pfc_ds.bench.data`` (rewrites BENCHMARKS.md's data section).

Measures, in one run and interleaved (so load from other work on a shared machine hits every
row alike), img/s of: our DALI loader (CPU decode + crop_mirror_normalize) with the ``native``
and the ``external`` reader, the ``decoder: nvimgcodec`` loader (nvImageCodec CPU decode, torch
mirror and normalise, same sample order as ``external``), and a torch DataLoader + Pillow with 2
workers over the same ``.rec``. DALI's ``mixed`` (GPU) decode runs only when
``GetCUDADeviceCount() > 0``, nvImageCodec's GPU decode only when torch sees a CUDA device.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipelines.build import build_loader
from data_pipelines.config import DataConfig
from data_pipelines.dali import gpu_count
from data_pipelines.faces import generate
from data_pipelines.imgcodec import load as load_nvimgcodec
from data_pipelines.scan import scan_rec
from data_pipelines.sources import DataError
from pfc_ds.bench.sections import write_section


class PillowRec(torch.utils.data.Dataset):
    """The same ``.rec`` through Pillow: decode, random mirror, normalise to CHW float32."""

    def __init__(self, prefix: str) -> None:
        scan = scan_rec(prefix)
        self.rec_path, self.start, self.length = scan.rec_path, scan.image_start, scan.image_len
        self.labels = scan.labels
        self._mm: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._mm is None:  # per worker process
            self._mm = np.memmap(self.rec_path, dtype=np.uint8, mode="r")
        data = self._mm[self.start[i] : self.start[i] + self.length[i]]
        rgb = np.array(Image.open(io.BytesIO(data.tobytes())).convert("RGB"))  # writable copy
        if np.random.random() < 0.5:
            rgb = rgb[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()
        return x.sub_(127.5).div_(127.5), int(self.labels[i])


def _epoch_rate(batches: Callable[[], int], epochs: int) -> float:
    """img/s over ``epochs`` full passes (``batches()`` runs one and returns images seen)."""
    t0 = time.perf_counter()
    seen = sum(batches() for _ in range(epochs))
    return seen / (time.perf_counter() - t0)


def _drain(loader) -> int:
    n = 0
    for images, _ in loader:
        n += images.shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = (
            int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
        )
    except (OSError, AttributeError):
        mem = float("nan")
    import nvidia.dali
    import PIL

    try:
        codec = f"nvImageCodec {load_nvimgcodec(gpu=False).__version__}, "
    except DataError:
        codec = ""
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, "
        f"{f'{gpu_count()} GPU(s)' if gpu_count() else 'no GPU'}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, DALI {nvidia.dali.__version__}, {codec}Pillow {PIL.__version__}, "
        f"numpy {np.__version__}"
    )


def load_average() -> float:
    """1-minute load average: other sessions share these cores, and the table says how much."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def run(args: argparse.Namespace, prefix: str) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    loaders = {}
    for reader in ("native", "external"):
        cfg = DataConfig(path=prefix, reader=reader, num_threads=args.threads, cache_dir=None)
        loaders[f"dali_{reader}"] = build_loader(
            cfg, batch_size=args.batch_size, rank=0, world_size=1, device="cpu"
        )
    codec = DataConfig(path=prefix, decoder="nvimgcodec", num_threads=args.threads, cache_dir=None)
    try:
        loaders["nvimgcodec"] = build_loader(
            codec, batch_size=args.batch_size, rank=0, world_size=1, device="cpu"
        )
    except DataError as exc:  # the package is missing: the row says so
        print(f"nvimgcodec row not run: {exc}", file=sys.stderr)
    torch_loader = torch.utils.data.DataLoader(
        PillowRec(prefix),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=True,
        drop_last=True,
        multiprocessing_context="spawn",  # forking next to DALI's threads can deadlock
    )
    runs = {name: (lambda ld=ld: _drain(ld)) for name, ld in loaders.items()}
    runs["torch"] = lambda: _drain(torch_loader)
    if gpu_count() > 0:  # chosen up front, never by catching a failure
        cfg = DataConfig(path=prefix, num_threads=args.threads, cache_dir=None)
        gpu = build_loader(cfg, batch_size=args.batch_size, rank=0, world_size=1, device="cuda")
        runs["dali_mixed"] = lambda: _drain(gpu)
    if torch.cuda.is_available() and "nvimgcodec" in loaders:
        gpu_codec = build_loader(
            codec, batch_size=args.batch_size, rank=0, world_size=1, device="cuda"
        )
        runs["nvimgcodec_gpu"] = lambda: _drain(gpu_codec)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up: pipeline build, worker start, page cache
    loads = [load_average()]
    for rep in range(args.repeats):
        for name, fn in runs.items():
            rates[name].append(_epoch_rate(fn, args.epochs))
            print(f"repeat {rep}: {name} {rates[name][-1]:.0f} img/s", file=sys.stderr)
        loads.append(load_average())
    rates["_load"] = loads
    return rates


def table(rates: dict[str, list[float]], args: argparse.Namespace, n: int, kb: float) -> str:
    loads = rates.pop("_load")
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["torch"]
    rows = [
        (
            "dali_native",
            "DALI CPU decode + normalize, `reader: native` (fn.readers.mxnet, filtered index)",
        ),
        (
            "dali_external",
            "DALI CPU decode + normalize, `reader: external` (exact global shuffle, default)",
        ),
        (
            "nvimgcodec",
            "nvImageCodec CPU decode + torch mirror/normalize, `decoder: nvimgcodec` (external order, no DALI)",
        ),
        ("torch", f"torch DataLoader + Pillow, {args.workers} workers"),
        ("dali_mixed", "DALI `mixed` (GPU nvJPEG) decode + normalize, fp16"),
        ("nvimgcodec_gpu", "nvImageCodec GPU (nvJPEG) decode + torch mirror/normalize, fp16"),
    ]
    lines = ["| pipeline | img/s (median) | range | vs DataLoader |", "|---|---|---|---|"]
    for key, label in rows:
        if key not in med:
            why = "no GPU in this session" if key.endswith(("mixed", "gpu")) else "not installed"
            lines.append(f"| {label} | not run: {why} | – | – |")
            continue
        lo, hi = min(rates[key]), max(rates[key])
        lines.append(
            f"| {label} | {med[key]:,.0f} | {lo:,.0f}–{hi:,.0f} | {med[key] / base:.2f}× |"
        )
    best = max(med["dali_native"], med["dali_external"]) / base
    worst = min(med["dali_native"], med["dali_external"]) / base
    verdict = "met" if worst >= 1.5 else ("met by one reader only" if best >= 1.5 else "NOT met")
    cmd = "python -m pfc_ds.bench.data" + (f" --data {args.data}" if args.data else "")
    return "\n".join(
        [
            "### Data loading (`data_pipelines`)",
            "",
            f"Machine: {machine()}. Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"1-minute load average {min(loads):.1f}–{max(loads):.1f} during the run (the cores are "
            "shared with other sessions, so absolute img/s vary between runs; the ratios are the "
            "comparison).",
            "",
            f"Command: `{cmd}` (batch {args.batch_size}, DALI `num_threads` {args.threads}, "
            f"torch threads 1 per process, {args.epochs} epochs per timing, {args.repeats} interleaved "
            "repeats; the table shows the median).",
            f"Data: {n:,} synthetic 112×112 JPEGs ({kb:.1f} KB mean) in one insightface-layout `.rec` "
            "from `python -m data_pipelines.synth`. Every row decodes, mirrors at random and normalises "
            "to CHW float32 on the CPU, and yields torch tensors.",
            "",
            *lines,
            "",
            f"Target DALI ≥ 1.5× the DataLoader: **{verdict}** (native {med['dali_native'] / base:.2f}×, "
            f"external {med['dali_external'] / base:.2f}×).",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pfc_ds.bench.data", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "--data", help="existing .rec prefix (default: synthesise --images into a temp dir)"
    )
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--benchmarks", default="BENCHMARKS.md", help="file whose data section is rewritten"
    )
    ap.add_argument("--no-write", action="store_true", help="print the section only")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        prefix = args.data
        if prefix is None:
            prefix = os.path.join(tmp, "train")
            generate(prefix, ids=max(args.images // 20, 1), per_id=20, workers=args.workers)
        scan = scan_rec(prefix)
        body = table(run(args, prefix), args, scan.num_images, float(scan.image_len.mean()) / 1000)
    print(body)
    if not args.no_write:
        write_section("data", body, args.benchmarks, say=True)


if __name__ == "__main__":
    main()
