"""The robustness experiment runner (issue 13), without training except one slow smoke run.

* ``--noise`` items parse to kinds and values; an unknown kind, a fraction outside [0, 1) or a
  non-positive long-tail exponent is an error naming ``--noise`` and the item.
* ``report.aggregate`` gives mean and sample std over seeds per (noise, rate); the markdown
  table and the PNG come from fake results.
* The run config asks the trainer for the held-out ``.bin``, the rate and the seeds.
* Slow: a tiny run through torchrun (2 gloo ranks) writes result.json, results.json,
  results.md and the plot; a second call skips the finished runs, and one with another
  config refuses to mix its runs with them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pfc_ds.experiments import report
from pfc_ds.experiments.robustness import Noise, main, parse_noise, parse_rates, run_config

FAKE = [
    {"noise": n, "rate": r, "seed": s, "accuracy": acc + 0.01 * s, "tar_at_far": 0.1 * s}
    for n, base in (("clean", 0.9), ("flip:0.4", 0.7))
    for s in range(3)
    for r, acc in ((1.0, base), (0.1, base + 0.05))
]


def test_parse_noise_kinds_and_errors() -> None:
    assert parse_noise("clean") == Noise("clean")
    assert parse_noise("conflict:0.3") == Noise("conflict", 0.3)
    assert parse_noise("longtail:1.5").synth_options() == {"long_tail": 1.5}
    assert Noise("flip", 0.4).folder == "flip-0.4" and Noise("flip", 0.4).name == "flip:0.4"
    for spec, message in (
        ("blur:0.3", "unknown kind 'blur'"),
        ("conflict:1.0", r"the fraction must be in \[0, 1\)"),
        ("flip:-0.2", r"the fraction must be in \[0, 1\)"),
        ("longtail:0", "the long-tail exponent must be > 0"),
        ("flip:x", "expected flip:NUMBER"),
    ):
        with pytest.raises(ValueError, match=f"--noise '{spec}': {message}"):
            parse_noise(spec)
    assert parse_rates("1.0,0.3,0.1") == [1.0, 0.3, 0.1]
    with pytest.raises(ValueError, match="--sample-rates"):
        parse_rates("1.0,0")


def test_cli_rejects_bad_noise(capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--noise", "clean,conflict:2", "--output", str(tmp_path)])
    assert exc.value.code == 2
    assert "--noise 'conflict:2': the fraction must be in [0, 1)" in capsys.readouterr().err


def test_aggregate_table_and_plot(tmp_path: Path) -> None:
    rows = report.aggregate(FAKE)
    assert [(r["noise"], r["rate"], r["n"]) for r in rows] == [
        ("clean", 1.0, 3),
        ("clean", 0.1, 3),
        ("flip:0.4", 1.0, 3),
        ("flip:0.4", 0.1, 3),
    ]
    assert rows[1]["accuracy"] == pytest.approx(0.96)  # 0.95 + mean(0, 0.01, 0.02)
    assert rows[1]["accuracy_std"] == pytest.approx(0.01)  # sample std of (0, .01, .02)
    assert rows[2]["tar_at_far"] == pytest.approx(0.1)
    assert rows[2]["tar_at_far_std"] == pytest.approx(0.1)
    table = report.markdown_table(rows).splitlines()
    assert table[0] == "| noise | r = 1 | r = 0.1 |"
    assert table[2] == "| clean | 0.9100 ± 0.0100 | 0.9600 ± 0.0100 |"
    assert table[3] == "| flip:0.4 | 0.7100 ± 0.0100 | 0.7600 ± 0.0100 |"
    one = report.aggregate(FAKE[:1])
    assert one[0]["accuracy_std"] == 0.0 and not math.isnan(one[0]["accuracy"])
    png = report.plot(rows, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_run_config_points_the_trainer_at_the_heldout_bin() -> None:
    summary = {"images": 40_000}
    cfg = run_config("/d/train", Path("/d/heldout.bin"), summary, rate=0.3, seed=2, steps=900)
    assert cfg["head"]["sample_rate"] == 0.3 and cfg["head"]["margin"] == [1.0, 0.3, 0.0]
    assert cfg["data"] == {
        "source": "rec",
        "image_size": 56,
        "num_threads": 1,
        "path": "/d/train",
        "seed": 2,
    }
    assert cfg["train"]["seed"] == 2 and cfg["train"]["max_steps"] == 900
    assert cfg["eval"]["sets"] == ["/d/heldout.bin"]
    assert cfg["optim"]["warmup_epochs"] == pytest.approx(10 * 128 / 40_000)


@pytest.mark.slow
def test_runner_smoke_run_then_resume(tmp_path: Path) -> None:
    argv = ["--noise", "conflict:0.5", "--sample-rates", "0.5", "--seeds", "1"]
    argv += ["--steps", "3", "--ids", "8", "--per-id", "4", "--heldout-pairs", "20"]
    argv += ["--output", str(tmp_path), "--set", "train.batch_size=8"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    assert [(r["noise"], r["rate"], r["seed"], r["steps"]) for r in runs] == [
        ("conflict:0.5", 0.5, 0, 3)
    ]
    assert all(0 <= r["accuracy"] <= 1 and r["step"] == 3 for r in runs)
    assert results["meta"]["data"]["conflict:0.5"]["labels"] == 12
    assert (tmp_path / "data/conflict-0.5/train_conflicts.csv").read_text().count("\n") == 5
    assert "| conflict:0.5 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "robustness.png").stat().st_size > 0
    before = (tmp_path / "runs/conflict-0.5/r0.5/seed0/result.json").stat().st_mtime_ns
    assert main(argv) == 0  # everything cached: no training
    assert (tmp_path / "runs/conflict-0.5/r0.5/seed0/result.json").stat().st_mtime_ns == before
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == runs
    with pytest.raises(RuntimeError, match="trained with another config"):
        main([*argv[:-2], "--set", "train.batch_size=4"])  # a cached run of another config
