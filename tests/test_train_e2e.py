"""End to end through the real entry points (issue test 5, plus preemption).

* ``./train.sh configs/demo_cpu.yaml`` on 2 CPU ranks (deepspeed launcher) runs to completion:
  the loss falls, ``metrics.jsonl`` has the required keys, a complete checkpoint and the
  exported backbone are written.
* Under ``torchrun`` at ZeRO-1, a SIGTERM to *one* rank stops *both* after the same step with a
  checkpoint of that step; ``--resume`` then continues from the next step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # train.sh picks it
    env["PYTHON"] = PY
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_train_sh_demo_cpu(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        ["./train.sh", "configs/demo_cpu.yaml", "--output", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OMP_NUM_THREADS=1" in proc.stderr  # 2 ranks on 2 cores, one thread each

    records = _records(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(20, 301, 20))
    for r in records:
        assert {"step", "loss", "lr", "img_per_s", "loss_scale"} <= set(r)
        assert r["img_per_s"] > 0 and r["loss_scale"] is None  # fp32: no loss scale
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.25 * first, (first, last)
    assert records[-1]["lr"] < records[0]["lr"]

    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    meta = json.loads((ckpt / tag / "meta.json").read_text())
    assert meta["step"] == 300 and meta["world_size"] == 2
    for rank in range(2):
        shard = torch.load(ckpt / tag / f"head_shard_{rank:05d}_of_00002.pt", weights_only=True)
        assert shard["weight"].shape == (150, 128)
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000200", "step00000300"]
    backbone = torch.load(out / "backbone.pt", weights_only=True)
    assert backbone["fc.weight"].shape == (128, 256)


def _torchrun(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "train.py",
        "--config",
        "configs/demo_cpu.yaml",
        "--deepspeed_config",
        "ds_configs/zero1_fp32.json",
        "--output",
        str(out),
        "--log-every",
        "1",
        "--set",
        "train.save_every=0",
        *extra,
    ]
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_torchrun_sigterm_one_rank_checkpoints_both_then_resume(tmp_path):
    import psutil

    out = tmp_path / "pre"
    proc = _torchrun(out, "--set", "train.epochs=50")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(_records(out / "metrics.jsonl")) < 5:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        workers = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "train.py" in " ".join(p.cmdline()) and "torch.distributed.run" not in p.cmdline()
        ]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "SIGTERM: saved step" in log, log[-3000:]
    stopped = _records(out / "metrics.jsonl")[-1]["step"]
    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    meta = json.loads((ckpt / tag / "meta.json").read_text())
    assert meta["step"] == stopped
    assert len(list((ckpt / tag).glob("head_shard_*_of_00002.pt"))) == 2
    assert len(list((ckpt / tag).glob("trainer_state_*.pt"))) == 2

    resumed = _torchrun(out, "--resume", "--max-steps", str(stopped + 2))
    log = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, log[-3000:]
    steps = [r["step"] for r in _records(out / "metrics.jsonl")]
    assert steps[-3:] == [stopped, stopped + 1, stopped + 2], steps[-6:]
    assert f"at step {stopped}" in log
