"""fp16 lockstep of the head with the engine, at ZeRO-0 and ZeRO-2 (issue test 3).

DeepSpeed refuses fp16 on this CPU, so the worker patches ``is_fp16_supported`` to run its fp16
code path anyway. W=2, shipped ``zero{0,2}_fp16.json`` with the initial scale lowered to 2^8.

* Step 1: the head's and the backbone's updates equal the fp32 run's within fp16 tolerance.
  A wrong loss-scale factor would be off by 256x: at ZeRO-2 DeepSpeed scales the loss inside
  ``engine.backward``; at ZeRO-0 it does not (and still unscales), which the trainer corrects.
* Step 2: rank 1 alone gets an inf in one of its head rows' gradients. Both ranks skip both
  optimizers (backbone and head bit-identical to after step 1), the pending rows are dropped,
  and the loss scale halves exactly once.
* Step 3 trains normally at the halved scale.
* Under fp32 a NaN loss raises ``FloatingPointError`` naming the step, on every rank at once.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed
from tests.trainer_helpers import cfg_dict, ds_config, full_head, make_trainer, rel_err

INITIAL_SCALE = 2.0**8


def _state(trainer) -> dict:
    from pfc_ds.train.engine import loss_scale

    return {
        "head": full_head(trainer)["weight"],
        "backbone": trainer.backbone_state(),
        "scale": loss_scale(trainer.engine),
        "window": trainer.head.window is not None,
    }


def _worker(rank: int, world: int, tmp: str) -> dict:
    from deepspeed.accelerator import get_accelerator

    from pfc_ds.train.faults import Faults

    get_accelerator().is_fp16_supported = lambda: True
    cfg = cfg_dict(train={"batch_size": 4, "max_steps": 3})
    out = {}
    for stage in (0, 2):
        ref = make_trainer(cfg, ds_config(stage, "fp32"), f"{tmp}/fp32_z{stage}")
        ref0 = _state(ref)
        ref.fit(stop_at=1)
        ref1 = _state(ref)
        # fp32 has no loss scale to back off: a NaN loss (here from one NaN centre on rank 0)
        # raises on every rank together, naming the step.
        if rank == 0:
            ref.head.bank.weight[0].fill_(float("nan"))
        try:
            ref.fit(stop_at=2)
            nan_error = None
        except FloatingPointError as exc:
            nan_error = str(exc)

        ds = ds_config(stage, "fp16", fp16={"initial_scale_power": 8})
        # The production fault: rank 1's head row gradient turns inf at step 2, after its
        # backward (what tools/gpu_check.sh injects on a GPU).
        faults = Faults("head_inf:step=2,rank=1", rank=rank, attempt=0)
        tr = make_trainer(cfg, ds, f"{tmp}/fp16_z{stage}", faults=faults)
        s0 = _state(tr)
        tr.fit(stop_at=1)
        s1 = _state(tr)
        tr.fit(stop_at=2)
        s2 = _state(tr)
        tr.fit(stop_at=3)
        s3 = _state(tr)
        out[stage] = {
            "ref": (ref0, ref1),
            "fp16": (s0, s1, s2, s3),
            "applied": [h["applied"] for h in tr.history],
            "losses": [h["loss"] for h in tr.history],
            "nan_error": nan_error,
        }
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_worker, 2, str(tmp_path_factory.mktemp("fp16")))


def _delta(after: dict, before: dict) -> dict:
    out = {"head": after["head"] - before["head"]}
    for k, v in after["backbone"].items():
        out[k] = v - before["backbone"][k]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", (0, 2))
def test_fp16_update_matches_fp32(runs, stage):
    for rank_out in runs:
        ref0, ref1 = rank_out[stage]["ref"]
        s0, s1, _, _ = rank_out[stage]["fp16"]
        assert s0["scale"] == INITIAL_SCALE and s1["scale"] == INITIAL_SCALE
        want, got = _delta(ref1, ref0), _delta(s1, s0)
        assert rel_err(got["head"], want["head"]) < 2e-2, rel_err(got["head"], want["head"])
        for name in want:
            if name != "head" and want[name].abs().sum() > 0:
                err = rel_err(got[name], want[name])
                assert err < 5e-2, f"ZeRO-{stage} backbone {name}: fp16 update off by {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", (0, 2))
def test_nan_loss_under_fp32_raises_naming_the_step_on_every_rank(runs, stage):
    for rank_out in runs:
        assert "non-finite loss or head gradient at step 2 (loss nan) under fp32" in (
            rank_out[stage]["nan_error"] or ""
        )


@pytest.mark.slow
@pytest.mark.parametrize("stage", (0, 2))
def test_inf_in_one_ranks_head_gradient_skips_both_everywhere(runs, stage):
    for rank_out in runs:
        r = rank_out[stage]
        _, s1, s2, s3 = r["fp16"]
        assert r["applied"] == [True, False, True]
        assert torch.equal(s2["head"], s1["head"])
        for name, value in s1["backbone"].items():
            assert torch.equal(s2["backbone"][name], value), name
        assert not s2["window"]
        assert s2["scale"] == INITIAL_SCALE / 2  # moved once, not once per rank or per optimizer
        assert s3["scale"] == INITIAL_SCALE / 2
        assert not torch.equal(s3["head"], s2["head"])
    # Both ranks hold the same backbone after the skip.
    for name, value in runs[0][stage]["fp16"][2]["backbone"].items():
        assert torch.equal(runs[1][stage]["fp16"][2]["backbone"][name], value), name
