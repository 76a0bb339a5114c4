"""Verification during training: every rank embeds a slice, all agree, rank 0 logs; a trained
demo model beats an untrained one on held-out synthetic classes; bad sets fail at startup."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pfc_ds.backbones import get_backbone
from pfc_ds.eval.bins import load_bin
from pfc_ds.eval.embedder import evaluate_bin
from pfc_ds.train.config import Config, ConfigError, load_config
from pfc_ds.train.evaluation import source_heldout_bin
from pfc_ds.train.synthetic import heldout_pairs
from tests.dist import run_distributed
from tests.trainer_helpers import ROOT, cfg_dict, ds_config, make_trainer

EVAL = {"synthetic_pairs": 60, "every": 3, "batch_size": 16}


def test_heldout_pairs_are_unseen_classes_and_alternate():
    images, issame = heldout_pairs(10, first_class=10, image_size=32, seed=7)
    assert images.shape == (20, 32, 32, 3) and images.dtype == torch.uint8
    assert issame.tolist() == [True, False] * 5
    same = images[0::2][issame].float() - images[1::2][issame].float()
    diff = images[0::2][~issame].float() - images[1::2][~issame].float()
    assert same.abs().mean() < diff.abs().mean()  # same class: same prototype, other noise


def test_synthetic_bin_round_trips(tmp_path):
    cfg = Config.from_dict(cfg_dict(eval=EVAL))
    path = source_heldout_bin(cfg, tmp_path)
    s = load_bin(path, 32)
    images, issame = heldout_pairs(60, first_class=10, image_size=32, seed=0)
    assert s.num_pairs == 60 and np.array_equal(s.issame, issame.numpy())
    assert np.array_equal(s.images, images.numpy())  # lossless PNG


def test_missing_or_bad_set_is_a_startup_error(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.bin is not a file"):
        Config.from_dict(cfg_dict(eval={"sets": [str(tmp_path / "missing.bin")]}))
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a pickle")
    cfg = Config.from_dict(cfg_dict(eval={"sets": [str(bad)]}))
    from pfc_ds.train.evaluation import Evaluator

    with pytest.raises(ConfigError, match=r"bad\.bin"):
        Evaluator(cfg, tmp_path, 0)


def _train_with_eval(rank: int, world: int, out: str, stage: int):
    cfg = cfg_dict(eval=EVAL, train={"max_steps": 6, "batch_size": 8})
    trainer = make_trainer(cfg, ds_config(stage), out)
    trainer.fit()
    return trainer.eval_history


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_eval_during_training_on_two_ranks(tmp_path, stage):
    out = tmp_path / "run"
    h0, h1 = run_distributed(_train_with_eval, 2, str(out), stage)
    assert [m["step"] for m in h0] == [3, 6]
    assert h0 == h1  # both ranks embedded a slice and scored the same gathered set
    for m in h0:
        assert 0.0 <= m["eval/synthetic/accuracy"] <= 1.0
        assert m["eval/synthetic/num_pairs"] == 60
    logged = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "eval/synthetic/accuracy" in line
    ]
    assert [r["step"] for r in logged] == [3, 6]  # rank 0 wrote each once
    assert logged[-1]["eval/synthetic/accuracy"] == h0[-1]["eval/synthetic/accuracy"]


@pytest.mark.slow
def test_trained_demo_beats_untrained(tmp_path):
    """The demo's own set and settings (one rank, 150 of its 300 steps): the model separates
    held-out classes it never saw; an untrained one cannot."""
    cfg = load_config(ROOT / "configs/demo_cpu.yaml", ["train.max_steps=150", "train.log_every=50"])
    run_distributed(_fit, 1, cfg, str(tmp_path))
    bin_path = tmp_path / "eval" / "synthetic.bin"
    torch.manual_seed(0)
    untrained = evaluate_bin(get_backbone("tiny", 128), bin_path, image_size=56)
    trained_model = get_backbone("tiny", 128)
    trained_model.load_state_dict(torch.load(tmp_path / "backbone.pt"))
    trained = evaluate_bin(trained_model, bin_path, image_size=56)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["eval/synthetic/accuracy"] == pytest.approx(trained.accuracy, abs=0.01)
    assert untrained.accuracy < 0.7 and trained.accuracy > 0.95


def _fit(rank: int, world: int, cfg: Config, out: str) -> None:
    import io

    from pfc_ds.train.loop import Trainer

    Trainer(cfg, output=out, stream=io.StringIO()).fit()
