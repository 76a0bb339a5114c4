"""TensorBoard out of the box, and optional W&B (issue 26, item 3).

* ``MetricsLogger`` writes event files that TensorBoard's own reader (``EventAccumulator``)
  parses, with every number of ``metrics.jsonl`` at its step: loss, LR, img/s, the loss scale
  where there is one (fp16), the time split, and the evaluation scalars.
* A demo-like run (the demo config, 2 ranks, a few steps) writes them with the default config:
  ``train.tensorboard`` is on unless switched off.
* ``train.wandb: true`` logs the same numbers to a W&B run (a stand-in module records the
  calls; a real offline run where wandb is installed).
"""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest

from pfc_ds.train.config import load_config
from pfc_ds.train.metrics import MetricsLogger
from tests.dist import run_distributed

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"
PHASES = {"data": 0.5, "backbone": 0.2, "head": 0.05, "optimizer": 0.02}  # seconds


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``folder``, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tensorboard_is_on_by_default():
    assert load_config(DEMO).train.tensorboard is True
    assert load_config(DEMO, ["train.tensorboard=false"]).train.tensorboard is False


def test_logger_events_parse_with_tensorboards_reader(tmp_path):
    logger = MetricsLogger(tmp_path, rank=0, total_steps=4, tensorboard=True,
                           stream=io.StringIO())  # fmt: skip
    phases = PHASES
    for step, scale in ((2, 1024.0), (4, 512.0)):  # fp16: a loss scale
        logger.log(step, loss=10.0 / step, lr=0.1 * step, images=256, steps=2,
                   loss_scale=scale, phases=phases, extra={"epoch": 0})  # fmt: skip
    logger.write({"step": 4, "eval/synthetic/accuracy": 0.75, "eval/synthetic/threshold": 1.2})
    logger.close()
    rows = _rows(tmp_path / "metrics.jsonl")
    events = _events(tmp_path / "tensorboard")
    for key in ("loss", "lr", "img_per_s", "loss_scale", "time_backbone", "epoch"):
        want = [(r["step"], r[key]) for r in rows[:2]]
        got = events[f"train/{key}"]
        assert [s for s, _ in got] == [2, 4], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key
    assert events["eval/synthetic/accuracy"] == [(4, 0.75)]
    assert events["eval/synthetic/threshold"] == [(4, pytest.approx(1.2, rel=1e-6))]
    assert not any(tag.startswith("train/step") for tag in events)

    # fp32/bf16: no loss scale, so no train/loss_scale (rather than a made-up value).
    fp32 = tmp_path / "fp32"
    logger = MetricsLogger(fp32, rank=0, total_steps=1, tensorboard=True, stream=io.StringIO())
    logger.log(1, loss=1.0, lr=0.1, images=8, steps=1, loss_scale=None, phases=phases)
    logger.close()
    assert set(_events(fp32 / "tensorboard")) == {
        "train/loss", "train/lr", "train/img_per_s", *(f"train/time_{p}" for p in phases)
    }  # fmt: skip


def _demo_like(rank: int, world: int, out: str) -> list[dict]:
    from tests.trainer_helpers import make_trainer

    sets = ["train.max_steps=6", "train.log_every=2", "train.save_every=0", "eval.every=3",
            "eval.synthetic_pairs=100"]  # fmt: skip
    cfg = load_config(DEMO, sets).to_dict()  # the demo's own config: tensorboard by default
    del cfg["data"]["pipeline"]  # empty: not a key of the synthetic source
    trainer = make_trainer(cfg, str(ROOT / cfg["train"]["deepspeed"]), out)
    return trainer.fit()


def test_a_demo_like_run_writes_tensorboard_events(tmp_path):
    out = tmp_path / "demo"
    run_distributed(_demo_like, 2, str(out))
    rows = _rows(out / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/synthetic/accuracy" in r]
    events = _events(out / "tensorboard")
    assert [s for s, _ in events["train/loss"]] == [2, 4, 6]
    for key in ("loss", "lr", "img_per_s"):
        got = [v for _, v in events[f"train/{key}"]]
        assert got == pytest.approx([r[key] for r in train], rel=1e-6), key
    assert "train/loss_scale" not in events  # fp32 (ds_configs/cpu.json)
    assert [s for s, _ in events["eval/synthetic/accuracy"]] == [3, 6]
    got = [v for _, v in events["eval/synthetic/accuracy"]]
    assert got == pytest.approx([r["eval/synthetic/accuracy"] for r in evals], rel=1e-6)
    assert {"eval/synthetic/tar_at_far", "eval/synthetic/best_accuracy"} <= set(events)


class _FakeWandb(types.ModuleType):
    """Records what the logger asks of wandb."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.calls: list[tuple] = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        fake = self

        class Run:
            def log(self, values, step):
                fake.calls.append(("log", dict(values), step))

            def finish(self):
                fake.calls.append(("finish",))

        return Run()


def test_wandb_gets_the_same_numbers(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    config = {"train": {"batch_size": 4}}
    logger = MetricsLogger(tmp_path / "run", rank=0, total_steps=2, tensorboard=False,
                           stream=io.StringIO(), wandb=True, run_config=config)  # fmt: skip
    logger.log(1, loss=2.5, lr=0.1, images=8, steps=1, loss_scale=None, phases=PHASES)
    logger.write({"step": 2, "eval/x/accuracy": 0.5, "event": "text is not a number"})
    logger.close()
    init, log1, log2, finish = fake.calls
    assert init == ("init", {"project": "pfc_ds", "name": "run", "dir": str(tmp_path / "run"),
                             "config": config})  # fmt: skip
    assert log1[0] == "log" and log1[2] == 1
    assert log1[1]["train/loss"] == 2.5 and log1[1]["train/lr"] == 0.1
    assert log1[1]["train/time_data"] == 0.5 and "train/loss_scale" not in log1[1]
    assert log2 == ("log", {"eval/x/accuracy": 0.5}, 2)
    assert finish == ("finish",)
    # Other ranks never touch it.
    fake.calls.clear()
    MetricsLogger(tmp_path / "r1", rank=1, total_steps=1, wandb=True).close()
    assert fake.calls == []


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip(
        "wandb", reason="wandb is not installed (optional: pip install wandb for train.wandb)"
    )
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, rank=0, total_steps=1, tensorboard=False,
                           stream=io.StringIO(), wandb=True, run_config={"a": 1})  # fmt: skip
    logger.log(1, loss=2.5, lr=0.1, images=8, steps=1, loss_scale=None, phases=PHASES)
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs
