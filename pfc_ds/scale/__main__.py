"""``python -m pfc_ds.scale``: how far the head scales, measured and modelled.

    python -m pfc_ds.scale --ids 1e6,1e7,2e7 --sample-rates 0.1,0.3 --world-size 2 \\
        --embedding-size 128 --dtype fp16 --batch-size 128 --steps 5 --output runs/scale
    python -m pfc_ds.scale --ids 4e6 --world-size 1 --budget-gb 10 --output runs/budget
    python -m pfc_ds.scale --model --ids 1e8 --world-size 8 --embedding-size 512 \\
        --dtype fp16 --device-mem-gb 80 --backbone r100 --batch-size 128

Each point launches ``--world-size`` real ranks (torchrun; gloo on a CPU, NCCL on GPUs), builds
the head (timed), runs ``--steps`` head steps (forward, backward, sparse optimizer) between
barriers, and records the slowest rank's step time and the busiest rank's peak memory (RSS on
a CPU, max allocated on a GPU), split into bank, optimizer state, workspace and the rest, with
the memory model's prediction beside it. ``--model`` runs nothing: it prints the model's
memory per rank and the largest id count that fits ``--device-mem-gb``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pfc_ds.scale.model import BackboneSpec, HeadSpec, max_ids, placement, predict


def _counts(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pfc_ds.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ids", type=_counts, default=[1_000_000], help="e.g. 1e6,1e7,2e7")
    p.add_argument("--sample-rates", type=_floats, default=[0.1], help="e.g. 0.1,0.3")
    p.add_argument("--world-size", type=_counts, default=[2], help="ranks per point, e.g. 1,2")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp16")
    p.add_argument("--momentum-dtype", choices=("fp32", "fp16", "bf16"), default=None)
    p.add_argument(
        "--gemm-dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="auto: the storage dtype on a GPU (the trainer's default under fp16/bf16), fp32 on a CPU",
    )
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--chunk", type=int, default=None, help="softmax columns per block")
    p.add_argument(
        "--bank", choices=("device", "host", "disk"), default="device", help="where centres live"
    )
    p.add_argument("--bank-path", default=None, help="disk bank: a folder for its files")
    p.add_argument("--ranks-per-node", type=int, default=8, help="--model: for host RAM and disk")
    p.add_argument("--host-mem-gb", type=float, default=2048.0, help="--model: host RAM per node")
    p.add_argument("--disk-gb", type=float, default=4 * 7680.0, help="--model: disk per node")
    p.add_argument(
        "--link-gbps",
        type=float,
        default=None,
        help="--model: GB/s per node the offloaded rows move at (default: host 25 per GPU "
        "(PCIe), disk 10 per node (4 NVMe))",
    )
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (--model)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda if this machine has one (always cuda with --model)",
    )
    p.add_argument("--output", type=Path, default=Path("runs/scale"))
    p.add_argument("--budget-gb", type=float, default=None, help="bisect the largest ids per rank")
    p.add_argument("--model", action="store_true", help="print the memory model; run nothing")
    p.add_argument("--device-mem-gb", type=float, default=80.0, help="--model: memory per rank")
    p.add_argument(
        "--reserve-gb",
        type=float,
        default=2.0,
        help="--model on a GPU: CUDA context, NCCL buffers and allocator slack, outside the model",
    )
    p.add_argument(
        "--backbone",
        default=None,
        help="time the whole training step with this backbone (pfc_ds.profile on synthetic "
        "data); --model: add its memory",
    )
    p.add_argument("--config", default="configs/demo_cpu.yaml", help="--backbone: base config")
    p.add_argument("--deepspeed_config", default=None, help="--backbone: DeepSpeed JSON")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None)
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    p.add_argument("--backbone-optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p


def resolve(args) -> None:
    if args.device is None:
        import torch

        # --model plans for GPUs unless told otherwise; a run uses what this machine has.
        args.device = "cuda" if args.model or torch.cuda.is_available() else "cpu"
    if args.gemm_dtype == "auto":
        args.gemm_dtype = args.dtype if args.device == "cuda" and args.dtype != "fp32" else None
    elif args.gemm_dtype == "fp32":
        args.gemm_dtype = None


def head_spec(args, ids: int, rate: float, world: int) -> HeadSpec:
    return HeadSpec(
        ids=ids,
        world_size=world,
        embedding_size=args.embedding_size,
        sample_rate=rate,
        batch_size=args.batch_size,
        dtype=args.dtype,
        momentum_dtype=args.momentum_dtype,
        gemm_dtype=args.gemm_dtype,
        optimizer=args.optimizer,
        chunk=args.chunk,
        bank=args.bank,
        grad_accum=args.grad_accum,
        device=args.device,
    )


def model_report(args) -> str:
    """The ``--model`` table: memory per rank at each requested point, and the max ids."""
    runtime = None if args.device == "cpu" else 0.0
    budget = args.device_mem_gb * 1024 - (0 if args.device == "cpu" else args.reserve_gb * 1024)
    lines = []
    for world in args.world_size:
        backbone = None
        if args.backbone:
            backbone = BackboneSpec(
                args.backbone,
                args.embedding_size,
                args.image_size,
                args.precision or ("fp16" if args.device == "cuda" else "fp32"),
                args.zero_stage,
                args.backbone_optimizer,
                args.batch_size,
                world,
            )
        for rate in args.sample_rates:
            for ids in args.ids:
                h = head_spec(args, ids, rate, world)
                parts = predict(h, backbone, device=args.device, runtime_mb=runtime)
                split = ", ".join(
                    f"{k} {v / 1024:.2f}" for k, v in parts.items() if k != "total" and v
                )
                lines.append(
                    f"ids={ids:,} r={rate} W={world} D={args.embedding_size} {args.dtype} "
                    f"({args.bank} bank): {parts['total'] / 1024:.2f} GiB per rank ({split})"
                )
                if args.bank != "device":
                    lines.append("  " + offload_line(args, placement(h), world))
            per_node = min(world, args.ranks_per_node)
            top = max_ids(
                head_spec(args, 1, rate, world), budget, backbone, device=args.device,
                runtime_mb=runtime, host_mb_per_rank=args.host_mem_gb * 1024 / per_node,
                disk_mb_per_rank=args.disk_gb * 1024 / per_node,
            )  # fmt: skip
            where = f"{args.device_mem_gb:g} GiB per rank ({args.bank} bank"
            if args.bank == "host":
                where += f", {args.host_mem_gb:g} GiB host RAM per node"
            elif args.bank == "disk":
                where += f", {args.disk_gb:g} GiB disk per node"
            where += ")"
            if args.device != "cpu":
                where += f" less {args.reserve_gb:g} GiB reserve"
            lines.append(f"largest id count that fits {where} at r={rate}, W={world}: {top:,}")
    return "\n".join(lines)


def offload_line(args, where: dict[str, float], world: int) -> str:
    """Host RAM or disk per node, and the step's transfer against the link's bandwidth."""
    per_node = min(world, args.ranks_per_node)
    gbps = args.link_gbps or (25.0 * per_node if args.bank == "host" else 10.0)
    moved_node = where["moved_mb"] * per_node / 1024
    held = where["host_mb"] or where["disk_mb"]
    pinned = where["staging_mb"] * per_node / 1024
    return (
        f"{args.bank}: {held * per_node / 1024:.0f} GiB per node (+ {pinned:.1f} GiB pinned "
        f"staging), {moved_node:.2f} GiB moved per step per node = "
        f"{moved_node / gbps * 1e3:.0f} ms at {gbps:g} GB/s"
    )


def sweep_points(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Every (world size, sample rate, ids) point of the sweep that fits: its measured record;
    and why each other point was skipped."""
    from pfc_ds.scale.sweep import head_point, point_label, run_point, too_big, training_point

    records, skipped = [], []
    for world in args.world_size:
        for rate in args.sample_rates:
            for ids in args.ids:
                point = head_point(args, ids, rate, world)
                why = too_big(point)
                if why:
                    print(f"{point_label(point)}: skipped, {why}", flush=True)
                    skipped.append(f"{point_label(point)}: {why}")
                    continue
                print(f"{point_label(point)} ...", flush=True)
                if args.backbone:
                    point.update(
                        backbone=args.backbone,
                        image_size=args.image_size,
                        config=args.config,
                        deepspeed_config=args.deepspeed_config
                        or (
                            "ds_configs/zero2_fp16.json"
                            if args.device == "cuda"
                            else "ds_configs/cpu.json"
                        ),
                    )
                    rec = training_point(point, args.output)
                else:
                    rec = run_point(point, args.output)
                rec["kind"] = "sweep"
                records.append(rec)
                print(
                    f"  step {rec['step_ms']:.0f} ms, peak {rec['peak_mem_mb']:.0f} MB/rank "
                    f"(model {rec['predicted_mem_mb']:.0f}), build {rec['build_s']:.1f} s",
                    flush=True,
                )
    return records, skipped


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        from pfc_ds.scale.sweep import worker_main

        worker_main(json.loads(args.worker), args.worker_out)
        return 0
    resolve(args)
    if args.model:
        print(model_report(args))
        return 0

    from pfc_ds.scale import report
    from pfc_ds.scale.sweep import bisect_budget, head_point

    args.output.mkdir(parents=True, exist_ok=True)
    records, skipped = sweep_points(args)
    budget = None
    if args.budget_gb is not None:
        world, rate = args.world_size[0], args.sample_rates[0]
        base = head_point(args, args.ids[0], rate, world)
        budget_mb = args.budget_gb * 1024
        found, runs = bisect_budget(base, budget_mb, args.output)
        for rec in runs:
            rec.update(kind="budget", budget_gb=args.budget_gb, max_ids=found)
        records += runs
        model_top = max_ids(head_spec(args, 1, rate, world), budget_mb, device=args.device)
        budget = {
            "budget_gb": args.budget_gb,
            "max_ids": found,
            "model_max_ids": model_top,
            "sample_rate": rate,
            "world_size": world,
            "runs": len(runs),
        }
        print(f"max_ids for {args.budget_gb} GiB per rank: {found:,} (model {model_top:,})")
    md = report.write(args.output, records, budget)
    if skipped:
        md += "\n\nSkipped: " + "; ".join(skipped) + "."
        (args.output / "scale.md").write_text(md + "\n")
    print()
    print(md)
    print(f"\nwrote {args.output}/scale.json, scale.md, scale.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
