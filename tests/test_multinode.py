"""Two "nodes" on localhost (two torchrun launchers, ``--nnodes 2 --node_rank 0|1``, one rank
each) train exactly as one node with two ranks: the same head shards, backbone, data position
and RNG, bit for bit on CPU fp32."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["train.py", "--config", "configs/demo_cpu.yaml", "--deepspeed_config",
        "ds_configs/cpu.json", "--max-steps", "4", "--set", "train.save_every=2"]  # fmt: skip


def _launch(nnodes: int, node_rank: int, nproc: int, port: int, out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
           "--node_rank", str(node_rank), "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           *ARGS, "--output", str(out)]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_localhost_nodes_match_one_node(tmp_path):
    port = free_port()
    _finish([_launch(2, r, 1, port, tmp_path / "two") for r in (0, 1)])
    _finish([_launch(1, 0, 2, free_port(), tmp_path / "one")])

    for step in ("step00000002", "step00000004"):
        one, two = tmp_path / "one/checkpoints" / step, tmp_path / "two/checkpoints" / step
        names = sorted(p.name for p in one.iterdir())
        assert names == sorted(p.name for p in two.iterdir())
        shards = [n for n in names if n.startswith("head_shard_")]
        assert len([n for n in shards if n.endswith(".pt")]) == 2  # one per global rank
        for name in [*shards, "mp_rank_00_model_states.pt", "meta.json"]:
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
        for rank in (0, 1):
            a = torch.load(one / f"trainer_state_{rank:05d}.pt", weights_only=False)
            b = torch.load(two / f"trainer_state_{rank:05d}.pt", weights_only=False)
            assert a["data"] == b["data"] and a["step"] == b["step"] == int(step[4:])
            assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert (tmp_path / "one/backbone.pt").read_bytes() == (
        tmp_path / "two/backbone.pt"
    ).read_bytes()
