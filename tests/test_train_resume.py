"""Resume: 6 steps == 3 steps + resume + 3 steps, at the same and at a different world size.

Issue test 2. Global batch 8 throughout (W=2 x 4 or W=1 x 8), fp32, sample rate 1.

* Same world size (W=1 and W=2, ZeRO-0): the resumed run repeats the uninterrupted run's losses
  and weights to 1e-6 (data position, LR step, head RNG and momentum all restored).
* 2 -> 1 and 1 -> 2 ranks at ZeRO-0: right after the restore every global head row has exactly
  the saved weight and momentum and the backbone exactly the saved weights; the continued run
  then matches the uninterrupted run at the new world size within 1e-4 (world-size equivalence).
* 2 -> 1 and 1 -> 2 at ZeRO-2 with AdamW: the backbone optimizer state comes through DeepSpeed's
  universal checkpoint, so the continuation matches too.
* 2 -> 1 at ZeRO-2 with SGD: DeepSpeed's converter cannot carry SGD momentum; the trainer logs a
  warning, restores the weights exactly and re-initialises the backbone's momentum.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_distributed
from tests.trainer_helpers import (
    assert_close_states,
    cfg_dict,
    ds_config,
    full_head,
    make_trainer,
    snapshot,
    train,
)

STEPS, HALF = 6, 3
ADAMW = {
    "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01},
    "head": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
}
CASES = {  # name: (ZeRO stage, config sections)
    "z0": (0, {}),
    "z2_adamw": (2, ADAMW),
    "z2_sgd": (2, {}),
}


def _cfg(world: int, case: str) -> dict:
    _, extra = CASES[case]
    sections = {k: dict(v) for k, v in extra.items()}
    sections.setdefault("train", {}).update(batch_size=8 // world, max_steps=STEPS)
    return cfg_dict(**sections)


def _ds(case: str) -> dict:
    return ds_config(CASES[case][0])


def _first(rank: int, world: int, tmp: str, cases: list[str]) -> dict:
    """Uninterrupted run, run stopped at HALF (its checkpoint shared), and its resumption."""
    out = {}
    for case in cases:
        cfg, ds = _cfg(world, case), _ds(case)
        full = train(cfg, ds, f"{tmp}/{case}_full_w{world}")
        part = f"{tmp}/{case}_part_w{world}"
        make_trainer(cfg, ds, part).fit(stop_at=HALF)
        if rank == 0:
            shutil.copytree(part, f"{tmp}/{case}_share_w{world}")
        dist.barrier()
        resumed = train(cfg, ds, part, resume=True)
        out[case] = {"full": full, "resumed": resumed}
    return out


def _saved(folder: str, stage: int) -> dict:
    """Consolidated head and fp32 backbone as saved at step HALF, read without the trainer."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pfc_ds.checkpoint.shard_files import find_shards, load_shard
    from pfc_ds.head.reshard import consolidate

    tag = f"step{HALF:08d}"
    path = f"{folder}/checkpoints/{tag}"
    head = consolidate([load_shard(p) for p in find_shards(path)])
    if stage == 0:
        backbone = torch.load(f"{path}/mp_rank_00_model_states.pt", weights_only=False)["module"]
    else:
        backbone = get_fp32_state_dict_from_zero_checkpoint(f"{folder}/checkpoints", tag=tag)
    return {"head": head, "backbone": backbone}


def _cross(rank: int, world: int, tmp: str, src_world: int, cases: list[str]) -> dict:
    """Resume the other world size's HALF checkpoint here and finish the run."""
    records: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("pfc_ds")
    logger.setLevel(logging.INFO)
    logger.addHandler(Catch())
    out = {}
    for case in cases:
        folder = f"{tmp}/{case}_share_w{src_world}"
        saved = _saved(folder, CASES[case][0])
        records.clear()
        trainer = make_trainer(_cfg(world, case), _ds(case), folder, resume=True)
        at_resume = {
            "step": trainer.step,
            "head": full_head(trainer),
            "backbone": trainer.backbone_state(),
        }
        trainer.fit()
        out[case] = {
            "saved": saved,
            "at_resume": at_resume,
            "after": snapshot(trainer),
            "log": list(records),
        }
    if world == 1:
        out["finetune"] = _finetune(tmp)
    return out


def _finetune(tmp: str) -> dict:
    """model.pretrained: the exported backbone of the W=1 run, and a freshly built head."""
    src = f"{tmp}/z0_full_w1/backbone.pt"
    cfg = _cfg(1, "z0")
    cfg["model"]["pretrained"] = src
    tuned = make_trainer(cfg, _ds("z0"), f"{tmp}/finetune")
    fresh = make_trainer(_cfg(1, "z0"), _ds("z0"), f"{tmp}/fresh")
    want = torch.load(src, weights_only=True)
    got, init = tuned.backbone_state(), fresh.backbone_state()
    return {
        "backbone_loaded": all(torch.equal(got[k], v) for k, v in want.items()),
        "backbone_trained": not all(torch.equal(init[k], v) for k, v in want.items()),
        "head_fresh": torch.equal(tuned.head.weight, fresh.head.weight),
        "step": tuned.step,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("resume"))
    w2 = run_distributed(_first, 2, tmp, list(CASES))[0]
    w1 = run_distributed(_first, 1, tmp, ["z0", "z2_adamw"])[0]
    w1_from_2 = run_distributed(_cross, 1, tmp, 2, list(CASES))[0]
    w2_from_1 = run_distributed(_cross, 2, tmp, 1, ["z0", "z2_adamw"])[0]
    return {"w2": w2, "w1": w1, "1<-2": w1_from_2, "2<-1": w2_from_1}


@pytest.mark.slow
@pytest.mark.parametrize("world", ("w1", "w2"))
def test_resume_same_world_size(runs, world):
    case = runs[world]["z0"]
    full, resumed = case["full"], case["resumed"]
    want = dict(full, losses=full["losses"][HALF:])
    assert_close_states(resumed, want, 1e-6, f"{world} 3 + resume + 3 vs 6")


def _assert_restored_exactly(case: dict) -> None:
    at, saved = case["at_resume"], case["saved"]
    assert at["step"] == HALF
    # Every global head row keeps its weight and momentum, bit for bit.
    assert torch.equal(at["head"]["weight"], saved["head"]["weight"])
    assert torch.equal(at["head"]["momentum"], saved["head"]["momentum"])
    for name, value in saved["backbone"].items():
        assert torch.equal(at["backbone"][name], value.float()), name


@pytest.mark.slow
@pytest.mark.parametrize(("key", "full_key"), [("1<-2", "w1"), ("2<-1", "w2")])
def test_resume_other_world_size_zero0(runs, key, full_key):
    case = runs[key]["z0"]
    _assert_restored_exactly(case)
    # The continuation equals the uninterrupted run at the new world size.
    full = runs[full_key]["z0"]["full"]
    want = dict(full, losses=full["losses"][HALF:])
    assert_close_states(case["after"], want, 1e-4, f"{key} ranks, ZeRO-0")


@pytest.mark.slow
@pytest.mark.parametrize(("key", "full_key"), [("1<-2", "w1"), ("2<-1", "w2")])
def test_resume_other_world_size_universal_checkpoint(runs, key, full_key):
    case = runs[key]["z2_adamw"]
    assert any("universal restore" in m for m in case["log"]), case["log"]
    _assert_restored_exactly(case)
    full = runs[full_key]["z2_adamw"]["full"]
    want = dict(full, losses=full["losses"][HALF:])
    assert_close_states(case["after"], want, 1e-4, f"{key} ranks, ZeRO-2, AdamW")


@pytest.mark.slow
def test_resume_other_world_size_sgd_reinitialises_momentum_with_warning(runs):
    case = runs["1<-2"]["z2_sgd"]
    assert any("optimizer state (momentum) is re-initialised" in m for m in case["log"])
    _assert_restored_exactly(case)
    # Exact weights: the first resumed step has the uninterrupted run's loss; later steps
    # differ because the backbone's momentum restarted from zero.
    full = runs["w2"]["z2_sgd"]["full"]
    assert case["after"]["losses"][0] == pytest.approx(full["losses"][HALF], rel=1e-5)
    assert case["after"]["losses"][1] != pytest.approx(full["losses"][HALF + 1], rel=1e-5)


@pytest.mark.slow
def test_pretrained_backbone_starts_a_fresh_head(runs):
    assert runs["1<-2"]["finetune"] == {
        "backbone_loaded": True,
        "backbone_trained": True,
        "head_fresh": True,
        "step": 0,
    }
