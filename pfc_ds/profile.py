"""``python -m pfc_ds.profile``: where a training step's time and memory go.

    python -m pfc_ds.profile --config configs/demo_cpu.yaml --steps 20 --output runs/profile
    python -m pfc_ds.profile --config configs/ms1mv3_r50.yaml --deepspeed_config ds_configs/zero2_fp16.json --trace
    MODULE=pfc_ds.profile ./train.sh configs/demo_cpu.yaml --steps 20     # or under deepspeed / torchrun

It trains like ``train.py`` (same config, DeepSpeed JSON and launchers; without a launcher it
starts its own ranks through torchrun, one per GPU or 2 on a CPU) for ``--warmup`` + ``--steps``
optimizer steps, writing no checkpoint, and times every phase of each step with
``pfc_ds.phases``: CUDA events on a GPU, host timers on a CPU (where every op, gloo's included,
is synchronous). DeepSpeed's collectives are timed as ``comm`` through its backend object. It
writes ``profile.json``, prints a table, and plots ``time_split.png`` and ``memory_split.png``.
``--trace`` adds a ``torch.profiler`` trace (TensorBoard / Perfetto), ``--flops`` DeepSpeed's
flops profiler for the backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MB = 2**20
# The step's phases in the order they run; ``head`` is the head's forward and backward (its
# sub-phases below), ``other`` the loop's own time between phases.
PHASES = (
    "data",
    "backbone_fwd",
    "head",
    "backbone_bwd",
    "comm",
    "backbone_opt",
    "head_opt",
    "other",
)
# Inside ``head``: collectives include waiting for the slowest rank; ``softmax`` is the rest
# (norms, margin, online softmax, elementwise gradient).
HEAD_PARTS = ("sample", "gather", "gemm", "collectives", "softmax")
_COMM_OPS = (
    "all_reduce",
    "inference_all_reduce",
    "all_reduce_coalesced",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_base",
    "all_gather_coalesced",
    "all_to_all_single",
    "barrier",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import deepspeed

    from pfc_ds.train.cli import add_arguments

    p = argparse.ArgumentParser(
        prog="python -m pfc_ds.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="steps run first and not measured")
    p.add_argument("--trace", action="store_true", help="write a torch.profiler trace")
    p.add_argument("--flops", action="store_true", help="DeepSpeed's flops profiler")
    p.add_argument("--ranks", type=int, default=None, help="ranks when it launches itself")
    p.set_defaults(output="runs/profile")
    deepspeed.add_config_arguments(p)
    return p.parse_args(argv)


# ---- timing DeepSpeed's collectives ----------------------------------------------------------


class _TimedBackend:
    """DeepSpeed's communication backend with every collective inside a ``comm`` span."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if name not in _COMM_OPS or not callable(attr):
            return attr
        from pfc_ds import phases

        def timed(*args, **kwargs):
            with phases.span("comm"):
                return attr(*args, **kwargs)

        return timed


def time_deepspeed_comm() -> None:
    from deepspeed.comm import comm as ds_comm

    if ds_comm.cdb is not None and not isinstance(ds_comm.cdb, _TimedBackend):
        ds_comm.cdb = _TimedBackend(ds_comm.cdb)


# ---- memory ----------------------------------------------------------------------------------


def _tensors(obj, seen: set[int], out: dict[int, int], depth: int = 0) -> None:
    """Storages of the tensors reachable from ``obj`` (optimizer state, masters, partitions)."""
    import torch

    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta":
            st = obj.untyped_storage()
            out[st.data_ptr()] = st.nbytes()
        return
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, torch.optim.Optimizer):
        items = [obj.state, obj.param_groups]
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("deepspeed", "torch")):
        items = vars(obj).values()
    else:
        return
    for item in items:
        _tensors(item, seen, out, depth + 1)


def backbone_memory(engine) -> dict[str, float]:
    """MB this rank holds for the backbone: its parameters (ZeRO-3: the partition) and the
    optimizer's tensors (state, fp32 masters, gradient partitions), counted once each."""
    params: dict[int, int] = {}
    for p in engine.module.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p if t is None or p.numel() else t
        st = t.untyped_storage()
        params[st.data_ptr()] = st.nbytes()
    grads = {}
    for p in engine.module.parameters():
        if p.grad is not None:
            st = p.grad.untyped_storage()
            grads[st.data_ptr()] = st.nbytes()
    found: dict[int, int] = {}
    _tensors(engine.optimizer, set(), found)
    state = {k: v for k, v in found.items() if k not in params and k not in grads}
    return {
        "backbone_params": sum(params.values()) / MB,
        "backbone_grads": sum(grads.values()) / MB,
        "backbone_optimizer": sum(state.values()) / MB,
    }


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---- one rank --------------------------------------------------------------------------------


def split_of(entries: list[dict[str, float]]) -> dict[str, float]:
    """Mean ms per phase over the measured steps (one ``PhaseClock.collect()`` each), so the
    phases add up to the mean step; ``head/*`` break ``head`` down."""
    rows = []
    for raw in entries:
        parts = {p: raw.get(f"head/{p}", 0.0) for p in HEAD_PARTS if p != "softmax"}
        parts["softmax"] = raw.get("head_fwd", 0.0) + raw.get("head_bwd", 0.0)
        row = {
            "data": raw.get("data", 0.0),
            "backbone_fwd": raw.get("backbone_fwd", 0.0),
            "head": sum(parts.values()),
            "backbone_bwd": raw.get("backward", 0.0),
            "comm": raw.get("comm", 0.0),
            "backbone_opt": raw.get("backbone_opt", 0.0),
            "head_opt": raw.get("head_opt", 0.0),
            "other": raw.get("step", 0.0) + raw.get("loop", 0.0) + raw.get("checkpoint", 0.0),
        }
        row.update({f"head/{k}": v for k, v in parts.items()})
        rows.append(row)
    return {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}


def _make_trainer(args: argparse.Namespace, splits: dict[int, dict[str, float]]):
    """The run's trainer: no checkpoints, no TensorBoard, no evaluation; CUDA-event timers on a
    GPU; every step's phase split into ``splits``."""
    import torch

    from pfc_ds import phases
    from pfc_ds.train import Trainer
    from pfc_ds.train.cli import config_from_args
    from pfc_ds.train.engine import build_ds_config

    out = Path(args.output)
    cfg = config_from_args(args)
    cfg.train.output = str(out / "run")
    cfg.train.save_every = 0
    cfg.train.tensorboard = False
    cfg.eval.sets, cfg.eval.synthetic_pairs = [], 0  # time training steps only
    ds = build_ds_config(args.deepspeed_config or cfg.train.deepspeed, cfg, world_size=None)
    if args.flops:
        ds["flops_profiler"] = {
            "enabled": True,
            "profile_step": args.warmup + 1,
            "module_depth": -1,
            "top_modules": 3,
            "detailed": False,
            "output_file": str(out / "flops.txt"),
        }
    return Trainer(
        cfg,
        ds_config=ds,
        clock=phases.PhaseClock(events=torch.cuda.is_available()),
        on_split=lambda step, split: splits.__setitem__(step, split),
    )


def _profiler(args: argparse.Namespace, device, rank: int):
    """A ``torch.profiler`` over up to 5 measured steps (``--trace``), or ``None``."""
    import torch

    if not args.trace:
        return None
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(
        activities=acts,
        schedule=torch.profiler.schedule(wait=0, warmup=1, active=min(args.steps, 5)),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(
            str(Path(args.output) / "trace"), worker_name=f"rank{rank}"
        ),
        record_shapes=False,
    )


def run_rank(args: argparse.Namespace) -> dict[str, Any] | None:
    """Profile on this rank (the process group comes up in ``Trainer``)."""
    import torch
    import torch.distributed as dist

    runtime_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    splits: dict[int, dict[str, float]] = {}
    trainer = _make_trainer(args, splits)
    device = trainer.engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    time_deepspeed_comm()
    marks: dict[int, float] = {}
    prof = _profiler(args, device, trainer.rank)
    lane = trainer.head.bank.lane  # an offloaded bank's traffic: counted over measured steps
    start = trainer.step
    first, last = start + args.warmup, start + args.warmup + args.steps

    def on_step(step: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if lane is not None and step == first:  # before the mark: not timed
            trainer.head.bank.flush()
            lane.update(dict.fromkeys(lane, 0))
        marks[step] = time.perf_counter()
        if prof is not None and step >= first:
            prof.step()

    if prof is not None:
        prof.start()
    marks[start] = time.perf_counter()
    trainer.fit(stop_at=last, save=False, on_step=on_step)
    if prof is not None:
        prof.stop()
    measured = [splits[s] for s in sorted(splits) if s > first]
    if not measured:
        raise SystemExit(f"no measured steps: run at least --warmup {args.warmup} + 1 steps")
    split = split_of(measured)
    mine = {
        "rank": trainer.rank,
        "step_ms": sum(split[p] for p in PHASES),
        "median_step_ms": statistics.median(sum(e.values()) for e in measured),
        "wall_step_ms": (marks[last] - marks[first]) * 1e3 / (last - first),
        "split_ms": split,
        "memory_mb": _memory(trainer, runtime_mb),
        "peak_mb": _peak_mb(device),
        "lane_per_step": None if lane is None else {k: v / args.steps for k, v in lane.items()},
    }
    ranks: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(ranks, mine)
    return summarise(args, trainer, ranks) if trainer.rank == 0 else None


def _memory(trainer, runtime_mb: float) -> dict[str, float]:
    """Where the peak went: backbone parts, head parts, runtime, the rest (activations)."""
    device = trainer.engine.device
    head_mem = {f"head_{k}": v / MB for k, v in trainer.head.memory().items()}
    memory = {**backbone_memory(trainer.engine), **head_mem}
    memory["runtime"] = runtime_mb if device.type == "cpu" else 0.0
    memory["activations_and_rest"] = max(0.0, _peak_mb(device) - sum(memory.values()))
    return memory


def summarise(args, trainer, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The aggregate: the step is the slowest rank's; phases are averaged over ranks."""
    step_ms = max(r["step_ms"] for r in ranks)
    keys = ranks[0]["split_ms"].keys()
    split = {k: statistics.fmean(r["split_ms"][k] for r in ranks) for k in keys}
    busiest = max(ranks, key=lambda r: r["peak_mb"])
    cfg = trainer.cfg
    return {
        "config": args.config,
        "deepspeed_config": args.deepspeed_config or cfg.train.deepspeed,
        "backbone": cfg.model.backbone,
        "precision": trainer.precision,
        "zero_stage": trainer.zero_stage,
        "world_size": trainer.world_size,
        "global_batch": trainer.global_batch,
        "num_classes": trainer.num_classes,
        "sample_rate": cfg.head.sample_rate,
        "bank": cfg.head.bank,
        "lane_per_step": busiest["lane_per_step"],
        "device": trainer.engine.device.type,
        "steps": args.steps,
        "timer": "cuda events" if trainer.engine.device.type == "cuda" else "host (synchronous)",
        "img_per_s": trainer.global_batch / (step_ms / 1e3),
        "wall_img_per_s": trainer.global_batch / (max(r["wall_step_ms"] for r in ranks) / 1e3),
        "step_ms": step_ms,
        "wall_step_ms": max(r["wall_step_ms"] for r in ranks),
        "split_ms": split,
        "memory_mb": busiest["memory_mb"],
        "peak_mb": busiest["peak_mb"],
        "per_rank": ranks,
    }


# ---- output ----------------------------------------------------------------------------------


def table(res: dict[str, Any]) -> str:
    s = res["split_ms"]
    lines = [
        f"{res['backbone']}, {res['precision']}, ZeRO-{res['zero_stage']}, W={res['world_size']}, "
        f"global batch {res['global_batch']}, {res['num_classes']:,} ids at r={res['sample_rate']} "
        f"({res['device']}, {res['timer']} timers, mean of {res['steps']} steps)",
        f"img/s {res['img_per_s']:.1f} (wall clock {res['wall_img_per_s']:.1f}); step "
        f"{res['step_ms']:.1f} ms (wall clock {res['wall_step_ms']:.1f} ms)",
        "",
        "| phase | ms/step | share |",
        "|---|---|---|",
    ]
    total = sum(s[p] for p in PHASES)
    for p in PHASES:
        lines.append(f"| {p} | {s[p]:.1f} | {s[p] / total:.1%} |")
        if p == "head":
            for part in HEAD_PARTS:
                lines.append(f"| &nbsp;&nbsp;head/{part} | {s['head/' + part]:.1f} | |")
        if p == "head_bwd":
            for part in HEAD_PARTS:
                lines.append(
                    f"| &nbsp;&nbsp;head/{part} (in head fwd+bwd) | {s['head/' + part]:.1f} | |"
                )
    lines += ["", "| memory (busiest rank) | MB |", "|---|---|"]
    for k, v in res["memory_mb"].items():
        lines.append(f"| {k} | {v:.1f} |")
    lines.append(
        f"| peak ({'max allocated' if res['device'] == 'cuda' else 'RSS'}) | {res['peak_mb']:.0f} |"
    )
    return "\n".join(lines)


def _bars(s: dict[str, float]) -> dict[str, float]:
    """The plot's stacked bars: the head drawn as its sub-phases."""
    out = {}
    for p in PHASES:
        if p == "head":
            out.update({f"head/{k}": s[f"head/{k}"] for k in HEAD_PARTS})
        else:
            out[p] = s[p]
    return out


def plots(res: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = res["per_rank"]
    names = [f"rank {r['rank']}" for r in ranks] + ["all (mean)"]
    splits = [_bars(r["split_ms"]) for r in ranks] + [_bars(res["split_ms"])]
    keys = list(splits[0])
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 2.2))
    left = [0.0] * len(names)
    cmap = plt.get_cmap("tab20")
    for i, k in enumerate(keys):
        vals = [s[k] for s in splits]
        ax.barh(names, vals, left=left, color=cmap(i), label=k)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.set_xlabel("ms per optimizer step")
    ax.set_title(f"time split: {res['backbone']}, {res['precision']}, W={res['world_size']}")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(out / "time_split.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 0.6 * len(ranks) + 2.2))
    mkeys = list(ranks[0]["memory_mb"])
    left = [0.0] * len(ranks)
    for i, k in enumerate(mkeys):
        vals = [r["memory_mb"][k] for r in ranks]
        ax.barh([f"rank {r['rank']}" for r in ranks], vals, left=left, color=cmap(i), label=k)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.set_xlabel("MB")
    unit = "max allocated" if res["device"] == "cuda" else "peak RSS"
    ax.set_title(f"memory split ({unit}): {res['backbone']}, W={res['world_size']}")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(out / "memory_split.png", dpi=110)
    plt.close(fig)


# ---- entry -----------------------------------------------------------------------------------


def launch_self(argv: list[str], nproc: int | None) -> int:
    """No launcher: start the ranks through torchrun (one per GPU, or 2 on a CPU)."""
    import torch

    from pfc_ds.scale.sweep import free_port

    gpus = torch.cuda.device_count()
    n = nproc or gpus or 2
    env = dict(os.environ)
    if not gpus:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node"]
    cmd += [str(n), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += ["-m", "pfc_ds.profile", *argv]
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ:
        return launch_self(argv, args.ranks)
    from pfc_ds.train import USER_ERRORS
    from pfc_ds.train.cli import setup_rank_logging

    rank = int(os.environ["RANK"])
    setup_rank_logging(rank)

    from pfc_ds.train.distributed import shutdown

    try:
        res = run_rank(args)
    except USER_ERRORS as exc:
        if rank == 0:
            print(f"pfc_ds.profile: error: {exc}", file=sys.stderr, flush=True)
        return 2
    shutdown()
    if res is None:
        return 0
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(res, indent=1))
    plots(res, out)
    print(table(res))
    print(f"\nwrote {out}/profile.json, time_split.png, memory_split.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
