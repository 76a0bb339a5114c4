"""tools/gpu_check.sh on a machine without a GPU: its plan fits the lent machine's limits, every
command line it would run names modules and configs that exist, and its verdicts judge runs as
intended (on records shaped like a real ``metrics.jsonl``)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _sh(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(Path.home())}
    return subprocess.run(
        [str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_plan_fits_one_600_s_command():
    out = _sh("--plan")
    assert out.returncode == 0, out.stderr
    budgets = [int(m) for m in re.findall(r"^\S+\s+(\d+)\s", out.stdout, re.M)]
    *steps, total = budgets
    assert sum(steps) == total <= 540
    assert len(steps) >= 8
    # Correctness before timing.
    names = [line.split()[0] for line in out.stdout.splitlines()[1:-1]]
    assert names.index("gpu_tests") < names.index("trainer_zero2_fp16") < names.index("head_bench")


def test_dry_run_names_only_what_exists():
    out = _sh("--dry-run")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "dry run: ok" in out.stdout
    assert "train.py --config configs/synthetic_3m_pfc01_r50.yaml" in out.stdout


def test_dry_run_catches_a_renamed_config(monkeypatch, tmp_path):
    gc = _gpu_check()
    monkeypatch.setattr(gc, "SMOKE_CONFIG", "configs/renamed.yaml")
    assert gc.dry_run(tmp_path) == 1
    argv = gc.trainer_commands(tmp_path)["zero2_fp16"][0]
    assert any("configs/renamed.yaml" in p for p in gc._problems(argv))
    monkeypatch.undo()
    argv = gc.trainer_commands(tmp_path)["zero2_fp16"][0]
    bad = [*argv[: argv.index("--set")], "--set", "head.smaple_rate=0.1"]
    assert any("smaple_rate" in p for p in gc._problems(bad))


def test_without_cuda_the_check_exits_3():
    out = _sh()
    assert out.returncode == 3
    assert out.stderr.strip().startswith("gpu_check: no CUDA device")


def _rows(n, *, skipped=(), scale=65536.0, halve_after=None, loss0=9.0):
    rows, s = [], scale
    for step in range(1, n + 1):
        rows.append({"step": step, "loss": loss0 - 0.1 * step, "loss_scale": s,
                     "img_per_s": 1000.0, "skipped": step in skipped})  # fmt: skip
        if step in skipped:
            s /= 2
    return rows


def test_fp16_smoke_verdict():
    gc = _gpu_check()
    good = gc.judge_fp16_smoke(_rows(40, skipped={1, 30}), 30, 40, 3)
    assert good["ok"], good["problems"]
    assert good["skipped_steps"] == [1, 30]
    assert good["scale_history"] == [[1, 65536.0], [2, 32768.0], [31, 16384.0]]
    # The injected step trained: the head's inf was not seen.
    missed = gc.judge_fp16_smoke(_rows(40, skipped={1}), 30, 40, 3)
    assert not missed["ok"] and any("step 30" in p for p in missed["problems"])
    storm = gc.judge_fp16_smoke(_rows(40, skipped={1, 2, 3, 4, 30}), 30, 40, 3)
    assert any("4 steps skipped" in p for p in storm["problems"])
    flat = _rows(40, skipped={30})
    for r in flat:
        r["loss"] = 9.0
    assert any("did not fall" in p for p in gc.judge_fp16_smoke(flat, 30, 40, 3)["problems"])
    # The scale moved twice at the injected step (once per optimizer): refused.
    twice = _rows(40, skipped={30})
    for r in twice[30:]:
        r["loss_scale"] = 16384.0
    assert any("not halved" in p for p in gc.judge_fp16_smoke(twice, 30, 40, 3)["problems"])


def test_resume_and_short_verdicts():
    gc = _gpu_check()
    rows = _rows(40) + [{"step": s, "loss": 5.0} for s in range(41, 46)]
    assert gc.judge_resume(rows, 41, 45)["ok"]
    restarted = _rows(40) + _rows(5)  # a run that started over instead of resuming
    assert not gc.judge_resume(restarted, 41, 45)["ok"]
    assert gc.judge_short(_rows(10), 10, 0)["ok"]
    nan = _rows(10)
    nan[4]["loss"] = float("nan")
    assert not gc.judge_short(nan, 10, 0)["ok"]


@pytest.mark.parametrize("missing", [True, False])
def test_junit_summary(tmp_path, missing):
    gc = _gpu_check()
    path = tmp_path / "j.xml"
    if not missing:
        path.write_text(
            '<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">'
            '<testcase classname="tests.t" name="a"/><testcase classname="tests.t" name="b">'
            "<failure>x</failure></testcase></testsuite></testsuites>"
        )
    got = gc._junit(path)
    if missing:
        assert got == {}
    else:
        assert got["tests"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1}
        assert got["failed"] == ["tests.t::b"]
