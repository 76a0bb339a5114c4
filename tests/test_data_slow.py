"""Multi-process and command-line checks (slow: separate interpreters)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from data_pipelines import DataConfig, build_loader
from tests.dist import run_distributed
from tests.test_data_helpers import decode_ids, make_folder, make_insightface

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _rank_epoch(rank: int, world_size: int, prefix: str, cache: str) -> dict:
    """One epoch on this process, sharded by the process group's global rank."""
    cfg = DataConfig(path=prefix, cache_dir=cache, num_threads=1, last_batch="pad")
    loader = build_loader(
        cfg,
        batch_size=4,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device="cpu",
        seed=9,
    )
    ids = [decode_ids(images)[: loader.valid] for images, _ in loader]
    return {
        "rank": rank,
        "steps": len(ids),
        "len": len(loader),
        "ids": np.concatenate(ids).tolist(),
    }


def test_two_processes_shard_by_global_rank(tmp_path: Path) -> None:
    make_insightface(tmp_path / "train", 37, per_id=4)
    out = run_distributed(_rank_epoch, 2, str(tmp_path / "train"), str(tmp_path / "cache"))
    assert [r["steps"] for r in out] == [r["len"] for r in out] == [5, 5]
    a, b = (set(r["ids"]) for r in out)
    assert not a & b and sorted(a | b) == list(range(37))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_synth_pack_check_command_lines(tmp_path: Path) -> None:
    made = _cli(
        "data_pipelines.synth",
        str(tmp_path / "s" / "train"),
        "--ids",
        "10",
        "--per-id",
        "4",
        "--workers",
        "1",
    )
    assert made.returncode == 0, made.stderr
    checked = _cli(
        "data_pipelines.check", str(tmp_path / "s" / "train"), "--full", "--workers", "2"
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines() == [
        "images=40 classes=10 min_label=0 max_label=9 decoded=40 problems=0"
    ]
    make_folder(tmp_path / "faces", 12, per_id=3)
    packed = _cli(
        "data_pipelines.pack",
        str(tmp_path / "faces"),
        str(tmp_path / "p" / "train"),
        "--workers",
        "2",
    )
    assert packed.returncode == 0, packed.stderr
    assert "packed 12 images" in packed.stdout
    checked = _cli(
        "data_pipelines.check", str(tmp_path / "p" / "train"), "--full", "--workers", "1"
    )
    assert (
        checked.stdout.splitlines()[0]
        == "images=12 classes=4 min_label=0 max_label=3 decoded=12 problems=0"
    )
    (tmp_path / "s" / "train.rec").write_bytes(b"")
    broken = _cli("data_pipelines.check", str(tmp_path / "s" / "train"), "--workers", "1")
    assert broken.returncode == 1 and "ERROR truncated: key=0 offset=0" in broken.stdout


def test_bench_rewrites_only_its_section(tmp_path: Path) -> None:
    bench = tmp_path / "BENCHMARKS.md"
    head, tail = (
        "# Benchmarks\n\n<!-- BEGIN head -->\nkeep\n<!-- END head -->\n",
        "\n<!-- BEGIN trainer -->\nx\n<!-- END trainer -->\n",
    )
    bench.write_text(f"{head}<!-- BEGIN data -->\nold\n<!-- END data -->{tail}")
    done = _cli(
        "pfc_ds.bench.data",
        "--images",
        "300",
        "--epochs",
        "1",
        "--repeats",
        "1",
        "--benchmarks",
        str(bench),
    )
    assert done.returncode == 0, done.stderr
    text = bench.read_text()
    assert text.startswith(f"{head}<!-- BEGIN data -->\n### Data loading") and text.endswith(
        f"<!-- END data -->{tail}"
    )
    section = text.split("<!-- BEGIN data -->")[1].split("<!-- END data -->")[0]
    assert "old" not in section and "| torch DataLoader + Pillow, 2 workers |" in section
    codec = next(line for line in section.splitlines() if "`decoder: nvimgcodec`" in line)
    assert float(codec.split("|")[2].replace(",", "")) > 0  # the third decoder's row, measured
    assert "not run: no GPU in this session" in section or "GPU(s)" in section


def test_missing_index_command_lines(tmp_path: Path) -> None:
    """A lost .idx: ``check`` says so in one line (no traceback), ``index`` rebuilds it."""
    make_insightface(tmp_path / "train", 12, per_id=3)
    idx = tmp_path / "train.idx"
    original = idx.read_bytes()
    idx.unlink()
    rec = tmp_path / "train.rec"
    checked = _cli("data_pipelines.check", str(tmp_path / "train"), "--workers", "1")
    assert checked.returncode == 2 and checked.stdout == ""
    assert checked.stderr == (
        f"error: {idx} not found; rebuild it with `python -m data_pipelines.index {rec}`\n"
    )
    rebuilt = _cli("data_pipelines.index", str(rec))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout == f"indexed 17 records of {tmp_path / 'train'}.rec into {idx}\n"
    assert idx.read_bytes() == original
    again = _cli("data_pipelines.index", str(rec))
    assert again.returncode == 2
    assert again.stderr == f"error: {idx} exists; pass --force to replace it\n"
    checked = _cli("data_pipelines.check", str(rec), "--full", "--workers", "1")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == "images=12 classes=4 min_label=0 max_label=3 decoded=12 problems=0\n"


def test_bench_index_rewrites_only_its_section(tmp_path: Path) -> None:
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text(
        "# B\n<!-- BEGIN data -->\nkeep\n<!-- END data -->\n<!-- BEGIN index -->\nSTALE-SECTION\n<!-- END index -->\ntail\n"
    )
    done = _cli(
        "pfc_ds.bench.index",
        "--records",
        "20000",
        "--identities",
        "900",
        "--benchmarks",
        str(bench),
        "--workdir",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    text = bench.read_text()
    assert text.startswith(
        "# B\n<!-- BEGIN data -->\nkeep\n<!-- END data -->\n<!-- BEGIN index -->\n### Index memory"
    )
    assert text.endswith("<!-- END index -->\ntail\n") and "STALE-SECTION" not in text
    assert (
        "| 4 | warm |" in text and "all 20,000 keys, offsets and labels equal the writer's" in text
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md"]  # the test file is gone
