"""Two "nodes" on localhost (two torchrun launchers, ``--nnodes 2 --node_rank 0|1``, one rank
each) train exactly as one node with two ranks: the same head shards, backbone, data position
and RNG, bit for bit on CPU fp32. ``test_multinode_hosts.py`` does it on two real network
hosts (namespaces)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.dist import free_port
from tests.multinode_helpers import ROOT, TRAIN, assert_same_run, env, torchrun

ARGS = [*TRAIN, "--max-steps", "4", "--set", "train.save_every=2"]


def _launch(nnodes: int, node_rank: int, nproc: int, port: int, out: Path) -> subprocess.Popen:
    cmd = [*torchrun(nnodes, node_rank, nproc, "127.0.0.1", port), *ARGS, "--output", str(out)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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
    assert_same_run(tmp_path / "one", tmp_path / "two", [2, 4])
