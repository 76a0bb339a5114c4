"""One run per output folder (issue 26, item 4).

* A folder holding a complete checkpoint is refused without ``--resume``, in one line naming
  the newest checkpoint and the ways on, by train.sh's pre-check and by the trainer itself;
  the refusal reads only, so nothing in the folder changes.
* ``--resume`` and ``train.auto_resume`` continue; ``--overwrite`` / ``train.overwrite: true``
  moves the earlier run's files to ``OUTPUT/replaced/<time>/`` and starts over, so
  ``metrics.jsonl`` and ``checkpoints/`` hold the new run only; other files stay.
* (slow) The issue's sequence through ``train.sh``, and a torchrun launch (no pre-check).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pfc_ds.train import preflight
from pfc_ds.train.cli import check
from pfc_ds.train.config import ConfigError, load_config
from tests.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"


def _fake_run(out: Path, steps: tuple[int, ...] = (20, 30)) -> None:
    """What a run leaves: complete checkpoints (a ``meta.json`` each), rows, events."""
    for step in steps:
        tag = out / "checkpoints" / f"step{step:08d}"
        tag.mkdir(parents=True)
        (tag / "meta.json").write_text(json.dumps({"step": step, "world_size": 2,
                                                   "zero_stage": 0}))  # fmt: skip
    (out / "checkpoints" / "latest").write_text(f"step{steps[-1]:08d}")
    (out / "checkpoints" / "step00000040").mkdir()  # a save cut short: not a checkpoint
    (out / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in steps))
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    (out / "backbone.pt").write_bytes(b"weights")
    (out / "notes.txt").write_text("the user's own file")


def _tree(folder: Path) -> dict[str, str]:
    """Every file and folder below ``folder`` with its content's hash and its mtime."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_file():
            out[key] = f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}"
        else:
            out[key] = "dir"
    return out


def _message(out: Path, step: int = 30) -> str:
    return (
        f"train.output: {out} already holds a run (newest checkpoint "
        f"{out}/checkpoints/step{step:08d}, step {step}): --resume continues it; a new "
        f"--output, or --overwrite (train.overwrite: true), starts over (the old run moves to "
        f"{out}/replaced/)"
    )


def test_a_used_output_is_refused_naming_the_newest_checkpoint(tmp_path):
    out = tmp_path / "run"
    _fake_run(out)
    t = load_config(DEMO).train
    assert preflight.reused_output(out, t, resume=False) == _message(out)
    assert preflight.reused_output(out, t, resume=True) is None
    for key in ("auto_resume", "overwrite"):
        assert preflight.reused_output(out, load_config(DEMO, [f"train.{key}=true"]).train,
                                       resume=False) is None  # fmt: skip
    ow = load_config(DEMO, ["train.overwrite=true"]).train
    assert preflight.reused_output(out, ow, resume=True) == (
        f"--resume continues the run in {out}, --overwrite (train.overwrite: true) starts it "
        "over: pass one of them"
    )
    # Only complete checkpoints count: rows, events or a save cut short leave nothing to resume.
    bare = tmp_path / "bare"
    (bare / "checkpoints" / "step00000010").mkdir(parents=True)
    (bare / "metrics.jsonl").write_text('{"step": 5}\n')
    assert preflight.reused_output(bare, t, resume=False) is None
    assert preflight.reused_output(tmp_path / "missing", t, resume=False) is None
    with pytest.raises(ConfigError, match=r"train\.overwrite and train\.auto_resume exclude"):
        load_config(DEMO, ["train.overwrite=true", "train.auto_resume=true"])


def test_train_sh_precheck_refuses_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    _fake_run(out)
    before = _tree(out)
    argv = ["--config", str(DEMO), "--output", str(out), "--max-steps", "40"]
    assert check(argv) == _message(out)
    assert check([*argv, "--resume"]) is None
    assert check([*argv, "--overwrite"]) is None
    assert check([*argv, "--set", "train.overwrite=true"]) is None
    assert check([*argv, "--set", "train.auto_resume=true"]) is None
    assert "pass one of them" in check([*argv, "--resume", "--overwrite"])
    assert _tree(out) == before  # the checks read only
    proc = subprocess.run([sys.executable, "-m", "pfc_ds.train.cli", *argv], cwd=ROOT,
                          env=_env(), capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == f"train.sh: error: {_message(out)}\n"
    assert _tree(out) == before


def test_starting_over_moves_the_earlier_run_aside(tmp_path):
    out = tmp_path / "run"
    _fake_run(out)
    before = _tree(out)
    moved = preflight.set_aside_previous_run(out)
    assert moved.parent == out / "replaced" and len(moved.name) == len("20261022-142305")
    # The run's files, byte for byte, under replaced/<time>/; the user's file stays.
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "replaced"]
    assert _tree(moved) == {
        k: v for k, v in before.items() if k != "notes.txt"
    }  # renames keep content and mtime
    assert preflight.set_aside_previous_run(out) is None  # nothing left to move
    _fake_run(out / "again", (5,))
    for name in ("checkpoints", "metrics.jsonl"):
        os.replace(out / "again" / name, out / name)
    second = preflight.set_aside_previous_run(out)
    assert second != moved and second.parent == out / "replaced"
    assert sorted(p.name for p in second.iterdir()) == ["checkpoints", "metrics.jsonl"]


def test_missing_wandb_is_refused_before_any_rank_starts(tmp_path):
    problem = check(["--config", str(DEMO), "--output", str(tmp_path / "w"),
                     "--set", "train.wandb=true"])  # fmt: skip
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert problem == (
            "train.wandb: true needs the wandb package (pip install wandb), or set "
            "train.wandb: false"
        )
    else:
        assert problem is None


# ---- through the entry points -------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OMP_NUM_THREADS", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_sh(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["./train.sh", "configs/demo_cpu.yaml", "--output", str(out), *extra],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _steps(path: Path) -> list[int]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


def _tags(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step*"))


@pytest.mark.slow
def test_the_issues_sequence_through_train_sh(tmp_path):
    out = tmp_path / "OUT"
    first = _train_sh(out, "--max-steps", "30")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _tags(out) == ["step00000030"] and _steps(out / "metrics.jsonl") == [20, 30]

    # The same with --max-steps 40, without --resume: refused before any rank starts.
    before = _tree(out)
    second = _train_sh(out, "--max-steps", "40")
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr == f"train.sh: error: {_message(out)}\n"
    assert "rank(s)/node" not in second.stderr  # the launcher never ran
    assert _tree(out) == before

    # torchrun skips the pre-check: the trainer refuses the same way, before training.
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "train.py", "--config", "configs/demo_cpu.yaml",
         "--output", str(out), "--max-steps", "40"],
        cwd=ROOT, env=dict(_env(), OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert torchrun.returncode != 0
    logs = torchrun.stdout + torchrun.stderr
    assert f"train.py: error: {_message(out)}" in logs, logs[-3000:]
    assert _tree(out) == before

    # --resume continues from step 30; train.auto_resume does it without the flag.
    resumed = _train_sh(out, "--max-steps", "40", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 30" in resumed.stdout + resumed.stderr
    auto = _train_sh(out, "--max-steps", "50", "--set", "train.auto_resume=true")
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "at step 40" in auto.stdout + auto.stderr
    assert _steps(out / "metrics.jsonl") == [20, 30, 40, 50]  # one run, no step twice
    assert _tags(out) == ["step00000040", "step00000050"]  # keep_last: 2

    # --overwrite: the earlier run moves aside whole, the new one starts at step 0.
    old = _tree(out)
    over = _train_sh(out, "--max-steps", "10", "--overwrite")
    assert over.returncode == 0, over.stderr[-3000:]
    (replaced,) = (out / "replaced").iterdir()
    assert f"the earlier run's files are now in {replaced}" in over.stdout + over.stderr
    assert _tree(replaced) == old
    assert _steps(out / "metrics.jsonl") == [10] and _tags(out) == ["step00000010"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000010"
