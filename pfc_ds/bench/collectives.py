"""The head's step alone on W gloo ranks: step time and the time in its collectives.

    python -m pfc_ds.bench.collectives [--before TREE] [--ranks 2] [--rounds 2]

The demo's head shapes (2 ranks x 64 images, D=128, 300 classes, r=0.5, CosFace, SparseSGD),
no backbone: the training profile's ``head/collectives`` also holds the wait for the slower
rank's backbone, this one only the collectives themselves (and the ranks' own skew in the head).
``--before`` runs an earlier checkout's head in the same rounds, interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(steps: int, warmup: int) -> None:
    import pfc_ds
    from pfc_ds import phases

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    margin = pfc_ds.CombinedMarginLoss(16.0, 1.0, 0.0, 0.4)
    head = pfc_ds.PartialFC(margin, 128, 300, sample_rate=0.5, even_batches=True)
    opt = pfc_ds.SparseSGD(head, lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(rank)

    def step() -> None:
        emb = torch.randn(64, 128, generator=g, requires_grad=True)
        head(emb, torch.randint(0, 300, (64,), generator=g)).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(warmup):
        step()
    dist.barrier()
    clock = phases.PhaseClock()
    phases.install(clock)
    t0 = time.perf_counter()
    for _ in range(steps):
        with phases.span("head"):
            step()
    took = (time.perf_counter() - t0) / steps
    phases.install(None)
    split = clock.collect()
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, {"step_ms": took * 1e3,
                                 "collectives_ms": split.get("head/collectives", 0.0) / steps})  # fmt: skip
    if rank == 0:
        print(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def _launch(tree: str | None, ranks: int, steps: int, warmup: int) -> dict:
    """One torchrun of this file's worker; ``tree``: an earlier checkout whose pfc_ds it
    imports (the worker is this file, run as a script, so the earlier tree needs none of it)."""
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
           f"--master_port={_free_port()}", os.path.abspath(__file__), "--rank-worker",
           "--steps", str(steps), "--warmup", str(warmup)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    per_rank = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: max(r[k] for r in per_rank) for k in per_rank[0]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--before", default="", help="an earlier checkout, run in the same rounds")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_worker:
        _rank(args.steps, args.warmup)
        return
    trees = {"after": None} | ({"before": args.before} if args.before else {})
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            r = _launch(tree, args.ranks, args.steps, args.warmup)
            print(f"  {name:6s} step {r['step_ms']:.2f} ms, head/collectives "
                  f"{r['collectives_ms']:.2f} ms", flush=True)  # fmt: skip
            runs[name].append(r)
    print(f"\n{args.ranks} gloo ranks, {args.steps} head steps after {args.warmup}, "
          f"median of {args.rounds} interleaved rounds (slowest rank):\n")  # fmt: skip
    print("| head | step ms | head/collectives ms |\n|---|---|---|")
    for name, rs in runs.items():
        print(f"| {name} | {statistics.median(r['step_ms'] for r in rs):.2f} | "
              f"{statistics.median(r['collectives_ms'] for r in rs):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
