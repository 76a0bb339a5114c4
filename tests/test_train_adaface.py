"""``head.margin: adaface`` on the CPU demo (configs/demo_cpu.yaml), 2 gloo ranks: the run
trains (the loss falls), resumes bit for bit (N steps straight == N/2, checkpoint, resume to N:
losses, backbone, head rows and AdaFace's running statistics), and scores its held-out ``.bin``.

Shortened from the demo's 300 steps of 64 images per rank to 48 of 32 (the demo's warmup of
0.034 epochs is then 20 steps), so it stays under a minute on two cores.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from pfc_ds.train.config import load_config
from tests.dist import run_distributed
from tests.trainer_helpers import full_head

ROOT = Path(__file__).resolve().parents[1]
STEPS, HALF = 48, 24
OVERRIDES = [
    "head.margin=adaface",
    f"train.max_steps={STEPS}",
    "train.batch_size=32",
    "train.log_every=4",
    f"train.save_every={HALF}",
    "train.keep_last=0",
    "eval.synthetic_pairs=200",
    f"eval.every={HALF}",
]


def _state(trainer) -> dict:
    margin = trainer.head.margin_loss
    return {
        "losses": [h["loss"] for h in trainer.history],
        "backbone": trainer.backbone_state(),
        "head": full_head(trainer),
        "stats": (margin.batch_mean.clone(), margin.batch_std.clone()),
        "margin": repr(margin),
        "evals": trainer.eval_history,
    }


def _fit(cfg, out: str, *, stop_at: int | None = None, resume: bool = False) -> dict:
    from pfc_ds.train.loop import Trainer

    trainer = Trainer(cfg, output=out, resume=resume, stream=io.StringIO())
    trainer.fit(stop_at=stop_at)
    return _state(trainer)


def _runs(rank: int, world: int, tmp: str) -> dict:
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", OVERRIDES)
    full = _fit(cfg, f"{tmp}/full")
    half = _fit(load_config(ROOT / "configs" / "demo_cpu.yaml", OVERRIDES), f"{tmp}/part",
                stop_at=HALF)  # fmt: skip
    dist.barrier()
    if rank == 0:
        shutil.copytree(f"{tmp}/part", f"{tmp}/half")  # the checkpoint at HALF, kept
    dist.barrier()
    resumed = _fit(load_config(ROOT / "configs" / "demo_cpu.yaml", OVERRIDES), f"{tmp}/part",
                   resume=True)  # fmt: skip
    return {"full": full, "half": half, "resumed": resumed}


def test_adaface_demo_trains_resumes_bit_for_bit_and_scores_its_bin(tmp_path):
    ranks = run_distributed(_runs, 2, str(tmp_path))
    full, half, resumed = ranks[0]["full"], ranks[0]["half"], ranks[0]["resumed"]
    assert full["margin"] == "AdaFace(s=16.0, m=0.4, h=0.333, t_alpha=0.01)"

    # Trains: the loss falls between the first and the last logged step.
    losses = full["losses"]
    assert len(losses) == STEPS and losses[-1] < 0.85 * losses[0], losses

    # The statistics moved from (20, 100) and are the same on both ranks.
    mean, std = full["stats"]
    assert abs(mean.item() - 20.0) > 0.1 and std.item() < 95.0
    for r in ranks:
        assert torch.equal(r["full"]["stats"][0], mean)
        assert torch.equal(r["full"]["stats"][1], std)

    # Resumes bit for bit: the resumed run's steps HALF+1..STEPS are the straight run's.
    assert half["losses"] == losses[:HALF]
    assert resumed["losses"][-(STEPS - HALF) :] == losses[HALF:]
    assert torch.equal(resumed["stats"][0], mean) and torch.equal(resumed["stats"][1], std)
    for key, value in full["backbone"].items():
        assert torch.equal(resumed["backbone"][key], value), key
    for key in ("weight", "momentum"):
        assert torch.equal(resumed["head"][key], full["head"][key]), key

    # The statistics at HALF are in every rank's head shard of that checkpoint.
    from pfc_ds.checkpoint.shard_files import find_shards, load_shard

    ckpt = tmp_path / "half" / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    shards = [load_shard(p) for p in find_shards(ckpt / tag)]
    assert len(shards) == 2
    for shard in shards:
        assert torch.equal(shard["margin_loss.batch_mean"], half["stats"][0])
        assert torch.equal(shard["margin_loss.batch_std"], half["stats"][1])
    assert not torch.equal(half["stats"][0], mean)  # and they moved on after it

    # Scores its held-out .bin at HALF and STEPS, and logs the scalars.
    assert [e["step"] for e in full["evals"]] == [HALF, STEPS]
    for e in full["evals"]:
        assert 0.0 <= e["eval/synthetic/accuracy"] <= 1.0
        assert e["eval/synthetic/num_pairs"] == 200
    assert (tmp_path / "full" / "eval" / "synthetic.bin").is_file()
    logged = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in logged if "eval/synthetic/accuracy" in r]
    assert [r["eval/synthetic/accuracy"] for r in scored] == [
        e["eval/synthetic/accuracy"] for e in full["evals"]
    ]
