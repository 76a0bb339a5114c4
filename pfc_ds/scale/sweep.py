"""Measured points of the sweep: one launch of W real ranks per point, so each peak is its own.

The parent (``python -m pfc_ds.scale``) starts ``torchrun`` per point; every rank runs
``worker_main``: build the head (timed), run warm-up and measured steps between barriers, and
report its times and memory. Rank 0 merges the ranks into one record.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pfc_ds.scale.model import MB, BackboneSpec, HeadSpec, placement, predict

_DTYPES = ("fp32", "fp16", "bf16")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_head(point: dict[str, Any]) -> dict[str, Any]:
    """This rank's measurements of one point (the process group is up)."""
    import torch
    import torch.distributed as dist

    from pfc_ds.train.build import make_head, make_head_optimizer
    from pfc_ds.train.config import HeadConfig

    rank = dist.get_rank()
    device = torch.device(point["device"])
    runtime = _peak_mb(device)
    dist.barrier()
    t0 = time.perf_counter()
    spec = HeadConfig(
        margin=[1.0, 0.0, 0.4], scale=64.0, sample_rate=point["sample_rate"],
        dtype=point["dtype"], momentum_dtype=point["momentum_dtype"],
        gemm_dtype=point["gemm_dtype"] or "fp32", chunk=point["chunk"],
        bank=point.get("bank", "device"), bank_path=point.get("bank_path"),
    )  # fmt: skip
    head = make_head(spec, embedding_size=point["embedding_size"], num_classes=point["ids"],
                     seed=0, device=device)  # fmt: skip
    if point["optimizer"] == "sgd":
        opt = make_head_optimizer(head, "sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4})
    else:
        opt = make_head_optimizer(head, "adamw", {"lr": 1e-3, "weight_decay": 0.05})
    _sync(device)
    build_s = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(1000 + rank)
    b, d = point["batch_size"], point["embedding_size"]
    emb = torch.randn(b, d, generator=gen).to(device).requires_grad_(True)
    times = []
    lane = head.bank.lane
    for i in range(point["warmup"] + point["steps"]):
        labels = torch.randint(0, point["ids"], (b,), generator=gen).to(device)
        dist.barrier()
        if i == point["warmup"] and lane is not None:
            lane.update(dict.fromkeys(lane, 0))
        t = time.perf_counter()
        head(emb, labels).backward()
        opt.step()
        opt.zero_grad()
        head.bank.flush()  # an offloaded bank's write-back is part of the step
        emb.grad = None
        _sync(device)
        if i >= point["warmup"]:
            times.append(time.perf_counter() - t)
    mem = {k: v / MB for k, v in head.memory().items()}
    return {
        "rank": rank,
        "times": times,
        "build_s": build_s,
        "peak_mb": _peak_mb(device),
        "runtime_mb": runtime,
        **{f"{k}_mb": v for k, v in mem.items()},
        "lane": None if lane is None else {k: v / point["steps"] for k, v in lane.items()},
    }


def merge(point: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One record: the step's time is the slowest rank's, memory the busiest rank's."""
    steps = [max(r["times"][i] for r in ranks) * 1e3 for i in range(len(ranks[0]["times"]))]
    busiest = max(ranks, key=lambda r: r["peak_mb"])
    head = HeadSpec(**{k: point[k] for k in HeadSpec.__dataclass_fields__ if k in point})
    runtime = busiest["runtime_mb"] if point["device"] == "cpu" else 0.0
    predicted = predict(head, device=point["device"], runtime_mb=runtime)
    if point["device"] == "cpu" and head.bank != "device":  # host RAM is this process's memory
        where = placement(head)
        predicted["host_bank"] = where["host_mb"] + where["resident_mb"]
        predicted["total"] += predicted["host_bank"]
    q = statistics.quantiles(steps, n=4) if len(steps) > 1 else [steps[0]] * 3
    return {
        **{k: point[k] for k in _RECORD_KEYS},
        "sampled_rows": head.sampled,
        "num_local": head.num_local,
        "step_ms": statistics.median(steps),
        "step_ms_q1": q[0],
        "step_ms_q3": q[2],
        "build_s": max(r["build_s"] for r in ranks),
        "peak_mem_mb": busiest["peak_mb"],
        "bank_mb": busiest["bank_mb"],
        "optimizer_state_mb": busiest["optimizer_state_mb"],
        "workspace_mb": busiest["workspace_mb"],
        # What RSS holds beyond the head's buffers (a disk bank's rows are not in RSS).
        "rest_mb": busiest["peak_mb"]
        - (0 if head.bank == "disk" else busiest["bank_mb"] + busiest["optimizer_state_mb"])
        - busiest["workspace_mb"],
        "runtime_mb": busiest["runtime_mb"],
        "predicted_mem_mb": predicted["total"],
        "predicted": predicted,
        "per_rank_peak_mb": [r["peak_mb"] for r in ranks],
        "lane_per_step": busiest["lane"],  # offloaded banks: seconds and bytes per step
        "placement": placement(head) if point.get("bank", "device") != "device" else None,
    }


_RECORD_KEYS = (
    "ids",
    "sample_rate",
    "world_size",
    "embedding_size",
    "dtype",
    "momentum_dtype",
    "gemm_dtype",
    "optimizer",
    "chunk",
    "batch_size",
    "steps",
    "device",
    "bank",
)


def worker_main(point: dict[str, Any], out: Path) -> None:
    """Entry of every rank of one point (under torchrun): measure, gather, rank 0 writes."""
    import torch
    import torch.distributed as dist

    cuda = point["device"] == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        point = {**point, "device": f"cuda:{local}"}
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        mine = measure_head(point)
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        if dist.get_rank() == 0:
            point = {**point, "device": "cuda" if cuda else "cpu"}
            out.write_text(json.dumps(merge(point, ranks)))
    finally:
        dist.destroy_process_group()


def available_mb() -> float:
    """MemAvailable (free plus reclaimable page cache), else the free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / MB


def too_big(point: dict[str, Any]) -> str | None:
    """Why a CPU point would not fit this machine's available memory (by the model), or None."""
    if point["device"] != "cpu":
        return None
    head = HeadSpec(**{k: point[k] for k in HeadSpec.__dataclass_fields__ if k in point})
    need = predict(head)["total"] * point["world_size"]
    avail = available_mb()
    if need > 0.9 * avail:
        return (
            f"the model predicts {need / 1024:.1f} GiB for {point['world_size']} rank(s); "
            f"this machine has {avail / 1024:.1f} GiB available"
        )
    return None


def run_point(point: dict[str, Any], workdir: Path, timeout: float | None = None) -> dict:
    """Launch W ranks for one point; returns its record (raises with the ranks' output)."""
    w = point["world_size"]
    out = workdir / f"point_{time.time_ns()}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
    cmd += ["--nproc_per_node", str(w), "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port()), "-m", "pfc_ds.scale"]
    cmd += ["--worker", json.dumps(point), "--worker-out", str(out)]
    env = dict(os.environ)
    if point["device"] == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // w))
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"point {point_label(point)} failed (exit {proc.returncode}):\n{tail}")
    record = json.loads(out.read_text())
    out.unlink()
    record["load_before"] = load  # 1-min load average: other work on the machine skews times
    return record


def point_label(p: dict[str, Any]) -> str:
    return f"ids={p['ids']:,} r={p['sample_rate']} W={p['world_size']} D={p['embedding_size']} {p['dtype']}"


def bisect_budget(
    base: dict[str, Any], budget_mb: float, workdir: Path, log=print
) -> tuple[int, list[dict]]:
    """The largest id count whose measured peak per rank fits ``budget_mb``, by bisection on
    measured runs bracketed by the model's prediction (PLSC's max-class search, measured)."""
    from pfc_ds.scale.model import max_ids

    head = HeadSpec(**{k: base[k] for k in HeadSpec.__dataclass_fields__ if k in base})
    guess = max_ids(head, budget_mb, device=base["device"])
    w = base["world_size"]
    records: list[dict] = []

    def fits(ids: int) -> bool:
        rec = run_point({**base, "ids": ids}, workdir)
        records.append(rec)
        ok = rec["peak_mem_mb"] <= budget_mb
        log(
            f"  budget {budget_mb:.0f} MB: ids={ids:,} peak {rec['peak_mem_mb']:.0f} MB "
            f"(model {rec['predicted_mem_mb']:.0f}) -> {'fits' if ok else 'over'}"
        )
        return ok

    lo, hi = int(guess * 0.9), int(guess * 1.1)
    while not fits(lo):
        lo, hi = lo // 2, lo
        if lo < w:
            return 0, records
    while fits(hi):
        lo, hi = hi, int(hi * 1.2)
    # 1 % of the id count is as fine as a run-to-run peak difference can resolve.
    while hi - lo > max(w, lo // 100):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, records


def head_point(args, ids: int, rate: float, world: int) -> dict[str, Any]:
    return {
        "ids": ids,
        "sample_rate": rate,
        "world_size": world,
        "embedding_size": args.embedding_size,
        "dtype": args.dtype,
        "momentum_dtype": args.momentum_dtype,
        "gemm_dtype": args.gemm_dtype,
        "optimizer": args.optimizer,
        "chunk": args.chunk,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": args.device,
        "bank": args.bank,
        "bank_path": None if args.bank_path is None else f"{args.bank_path}/ids{ids}_w{world}",
    }


def training_point(point: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """A whole training step (``--backbone``): ``pfc_ds.profile`` on the synthetic demo data
    with this point's head and backbone, read back as a sweep record."""
    out = workdir / f"profile_{time.time_ns()}"
    sets = {
        "model.backbone": point["backbone"],
        "model.embedding_size": point["embedding_size"],
        "data.num_classes": point["ids"],
        "data.image_size": point["image_size"],
        "data.num_images": 1_000_000_000,
        "head.sample_rate": point["sample_rate"],
        "head.dtype": point["dtype"],
        "train.batch_size": point["batch_size"],
        "train.log_every": 1_000_000,
    }
    if point["momentum_dtype"]:
        sets["head.momentum_dtype"] = point["momentum_dtype"]
    if point["chunk"]:
        sets["head.chunk"] = point["chunk"]
    cmd = [sys.executable, "-m", "pfc_ds.profile", "--config", point["config"]]
    cmd += ["--deepspeed_config", point["deepspeed_config"], "--output", str(out)]
    cmd += ["--steps", str(point["steps"]), "--warmup", str(point["warmup"])]
    cmd += ["--ranks", str(point["world_size"])]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "profile.json").is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"point {point_label(point)} failed (exit {proc.returncode}):\n{tail}")
    prof = json.loads((out / "profile.json").read_text())
    head = HeadSpec(**{k: point[k] for k in HeadSpec.__dataclass_fields__ if k in point})
    backbone = BackboneSpec(
        point["backbone"],
        point["embedding_size"],
        point["image_size"],
        prof["precision"],
        prof["zero_stage"],
        "adamw" if prof["memory_mb"]["backbone_optimizer"] > 0 else "sgd",
        point["batch_size"],
        point["world_size"],
    )
    mem = prof["memory_mb"]
    runtime = mem["runtime"] if point["device"] == "cpu" else 0.0
    predicted = predict(head, backbone, device=point["device"], runtime_mb=runtime)
    steps = [r["step_ms"] for r in prof["per_rank"]]
    return {
        **{k: point[k] for k in _RECORD_KEYS},
        "backbone": point["backbone"],
        "sampled_rows": head.sampled,
        "num_local": head.num_local,
        "step_ms": prof["step_ms"],
        "step_ms_q1": min(steps),
        "step_ms_q3": max(steps),
        "img_per_s": prof["img_per_s"],
        "build_s": float("nan"),
        "peak_mem_mb": prof["peak_mb"],
        "bank_mb": mem["head_bank"],
        "optimizer_state_mb": mem["head_optimizer_state"],
        "workspace_mb": mem["head_workspace"],
        "rest_mb": prof["peak_mb"]
        - mem["head_bank"]
        - mem["head_optimizer_state"]
        - mem["head_workspace"],
        "runtime_mb": mem["runtime"],
        "predicted_mem_mb": predicted["total"],
        "predicted": predicted,
        "split_ms": prof["split_ms"],
        "memory_mb": mem,
    }
