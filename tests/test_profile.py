"""``pfc_ds.phases`` and ``python -m pfc_ds.profile``: spans nest into exclusive times, cost
nothing when off, and the profiler's split adds up to the wall-clock step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pfc_ds import phases
from pfc_ds.profile import HEAD_PARTS, PHASES

ROOT = Path(__file__).resolve().parents[1]


def test_nested_spans_report_exclusive_times():
    clock = phases.PhaseClock()
    old = phases.install(clock)
    try:
        with phases.span("outer"):
            time.sleep(0.02)
            with phases.span("inner"):
                time.sleep(0.03)
            phases.begin("hooked")  # opened in one callback, closed in another
            time.sleep(0.01)
            phases.end("hooked")
        clock.add("known", 5.0)
        split = clock.collect()
    finally:
        phases.install(old)
    assert split["inner"] == pytest.approx(30, abs=8)
    assert split["hooked"] == pytest.approx(10, abs=8)
    assert split["outer"] == pytest.approx(20, abs=8)  # its own time only
    assert split["known"] == 5.0
    assert clock.collect() == {}


def test_mismatched_end_never_raises_and_closes_inner_spans():
    clock = phases.PhaseClock()
    clock.end("never_opened")
    clock.begin("a")
    clock.begin("b")
    clock.end("a")  # closes b too
    assert set(clock.collect()) == {"a", "b"}


def test_no_clock_means_no_recording():
    assert phases.active() is None
    ctx = phases.span("x")
    assert ctx is phases.span("y")  # one shared no-op context
    phases.begin("x")
    phases.end("x")


@pytest.mark.slow
def test_profile_split_adds_up_to_the_step(tmp_path):
    out = tmp_path / "prof"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pfc_ds.profile", "--config", "configs/demo_cpu.yaml",
         "--steps", "12", "--warmup", "3", "--output", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out / "profile.json").read_text())
    split = res["split_ms"]
    total = sum(split[p] for p in PHASES)
    assert total == pytest.approx(res["wall_step_ms"], rel=0.10)
    assert sum(split[f"head/{p}"] for p in HEAD_PARTS) == pytest.approx(split["head"])
    for p in ("data", "backbone_fwd", "head", "backbone_bwd", "comm", "backbone_opt", "head_opt"):
        assert split[p] > 0, p
    assert res["img_per_s"] == pytest.approx(res["global_batch"] / res["step_ms"] * 1e3)
    assert res["world_size"] == 2 and len(res["per_rank"]) == 2
    mem = res["memory_mb"]
    assert mem["head_bank"] == pytest.approx(150 * 128 * 4 / 2**20)  # 300 ids over 2 ranks, fp32
    assert mem["backbone_params"] > 0 and mem["backbone_optimizer"] > 0
    assert sum(mem.values()) == pytest.approx(res["peak_mb"], rel=0.01)
    for png in ("time_split.png", "memory_split.png"):
        assert (out / png).stat().st_size > 10_000
    assert "| head |" in proc.stdout and "img/s" in proc.stdout
