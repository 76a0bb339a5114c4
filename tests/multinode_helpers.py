"""Helpers shared by the multi-node tests (no tests here): the README's recipe as an argument
list, and the bit-for-bit comparison of two runs' outputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [
    "train.py",
    "--config",
    "configs/demo_cpu.yaml",
    "--deepspeed_config",
    "ds_configs/cpu.json",
]


def torchrun(nnodes: int, node_rank: int, nproc: int, addr: str, port: int) -> list[str]:
    """``torchrun --nnodes N --node_rank I --nproc_per_node P --master_addr A --master_port P``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--node_rank", str(node_rank), "--nproc_per_node", str(nproc),
            "--master_addr", addr, "--master_port", str(port)]  # fmt: skip


def env(**extra: str) -> dict[str, str]:
    """The test's environment for a launch: this tree on the path, one thread, no leftovers."""
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    for key in ("GLOO_SOCKET_IFNAME", "PFC_DS_FAULT"):
        if key not in extra:
            out.pop(key, None)
    return out


def assert_same_run(one: Path, two: Path, steps: list[int]) -> None:
    """The checkpoints of ``steps`` (head shards, backbone, meta, data position, RNG) and the
    final backbone of two output folders are equal bit for bit."""
    for step in steps:
        tag = f"step{step:08d}"
        a, b = one / "checkpoints" / tag, two / "checkpoints" / tag
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir()), tag
        shards = [n for n in names if n.startswith("head_shard_")]
        assert len([n for n in shards if n.endswith(".pt")]) == 2  # one per global rank
        for name in [*shards, "mp_rank_00_model_states.pt", "meta.json"]:
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{tag}/{name}"
        for rank in (0, 1):
            sa = torch.load(a / f"trainer_state_{rank:05d}.pt", weights_only=False)
            sb = torch.load(b / f"trainer_state_{rank:05d}.pt", weights_only=False)
            assert sa["data"] == sb["data"] and sa["step"] == sb["step"] == step
            assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    assert (one / "backbone.pt").read_bytes() == (two / "backbone.pt").read_bytes()


def losses(out: Path) -> dict[int, float]:
    """Step -> loss from ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}
