"""The loss-scale / NaN guard on 2 in-process ranks (issue 12, "An fp16 overflow storm").

DeepSpeed refuses fp16 on this CPU, so the worker patches ``is_fp16_supported`` (as
``test_train_fp16`` does). Faults come from ``PFC_DS_FAULT``: ``nan:step=S,count=N`` feeds NaN
images to N steps from S, each step once per process (so a rolled-back run replays them clean).

* A storm from step 3 under ``train.max_consecutive_skips: 4``: steps 3-6 skip, the scale halves
  each time, and the run stops at step 6 naming the step, the scale history and the last good
  checkpoint.
* ``min_loss_scale: 64``: the overflow at scale 64 (step 5) stops it at once.
* ``train.on_divergence: rollback``: a burst at steps 5-7 rolls back to step 4 at half the LR and
  the run finishes; the rollback is in ``metrics.jsonl`` and in the next checkpoint's LR factor.
  Under fp32 one NaN loss does the same.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed
from tests.trainer_helpers import cfg_dict, ds_config, make_trainer

FP16 = {"initial_scale_power": 8}


def _cfg(**train) -> dict:
    return cfg_dict(train={"max_steps": 10, "save_every": 2, "log_every": 1, **train})


def _run(cfg: dict, ds: dict, out: str, fault: str | None) -> dict:
    from pfc_ds.train.divergence import DivergenceError

    if fault:
        os.environ["PFC_DS_FAULT"] = fault
    try:
        tr = make_trainer(cfg, ds, out)
        try:
            tr.fit()
            error = None
        except DivergenceError as exc:
            error = str(exc)
    finally:
        os.environ.pop("PFC_DS_FAULT", None)
    metrics = Path(out, "metrics.jsonl")
    return {
        "error": error,
        "step": tr.step,
        "history": [(h["step"], h["loss"], h["lr"], h["applied"]) for h in tr.history],
        "rollbacks": tr.rollbacks,
        "events": [r for r in map(json.loads, metrics.read_text().splitlines()) if "event" in r]
        if metrics.is_file()
        else [],
        "tags": sorted(p.name for p in Path(out, "checkpoints").glob("step*")),
        "finite": all(torch.isfinite(v).all() for v in tr.backbone_state().values()),
    }


def _worker(rank: int, world: int, tmp: str) -> dict:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True
    fp16 = ds_config(0, "fp16", fp16=FP16)
    out = {}
    out["storm"] = _run(_cfg(max_consecutive_skips=4), fp16, f"{tmp}/storm", "nan:step=3,count=100")
    out["min_scale"] = _run(
        _cfg(),
        ds_config(0, "fp16", fp16={**FP16, "min_loss_scale": 64}),
        f"{tmp}/min_scale",
        "nan:step=3,count=100",
    )
    rollback = _cfg(save_every=4, max_consecutive_skips=3, on_divergence="rollback")
    out["clean"] = _run(rollback, fp16, f"{tmp}/clean", None)
    out["rollback"] = _run(rollback, fp16, f"{tmp}/rollback", "nan:step=5,count=3")
    path = f"{tmp}/rollback/checkpoints/step00000008/trainer_state_00000.pt"
    state = torch.load(path, weights_only=False)
    out["rollback"]["saved_lr_factor"] = state["lr_factor"]
    fp32 = _cfg(save_every=4, on_divergence="rollback")
    out["fp32_clean"] = _run(fp32, ds_config(0), f"{tmp}/fp32_clean", None)
    out["fp32_rollback"] = _run(fp32, ds_config(0), f"{tmp}/fp32_rollback", "nan:step=5")
    out["fp32_stop"] = _run(_cfg(save_every=4), ds_config(0), f"{tmp}/fp32_stop", "nan:step=5")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("divergence")
    return run_distributed(_worker, 2, str(tmp)), tmp


@pytest.mark.slow
def test_an_overflow_storm_stops_after_max_consecutive_skips(runs):
    results, tmp = runs
    for r in results:
        got = r["storm"]
        assert [a for _, _, _, a in got["history"]] == [True, True, False, False, False, False]
        assert got["error"] == (
            "training diverged: step 6: 4 optimizer steps in a row skipped for non-finite "
            "gradients (train.max_consecutive_skips=4); loss scale 256 from step 1, 128 from "
            f"step 4, 64 from step 5, 32 from step 6; last good checkpoint: {tmp}/storm/"
            "checkpoints/step00000004 (resume it with --resume at a lower optim.lr, or set "
            "train.on_divergence: rollback)"
        )
        assert got["tags"] == ["step00000002", "step00000004"] and got["finite"]


@pytest.mark.slow
def test_an_overflow_at_the_minimum_scale_stops_at_once(runs):
    results, tmp = runs
    for r in results:
        got = r["min_scale"]
        assert got["step"] == 5
        assert got["error"].startswith(
            "training diverged: step 5: overflow at the minimum loss scale 64 (min_loss_scale), "
            "which cannot back off further; loss scale 256 from step 1, 128 from step 4, 64 from "
            f"step 5; last good checkpoint: {tmp}/min_scale/checkpoints/step00000004"
        )


@pytest.mark.slow
def test_rollback_recovers_from_a_nan_burst_at_half_the_lr(runs):
    results, _ = runs
    for r in results:
        got, clean = r["rollback"], r["clean"]
        assert got["error"] is None and got["step"] == 10 and got["finite"]
        assert got["rollbacks"] == got["events"]  # logged in metrics.jsonl (rank 0 writes)
        (event,) = got["rollbacks"]
        assert {k: event[k] for k in ("step", "event", "to_step", "lr_factor")} == {
            "step": 7,
            "event": "rollback",
            "to_step": 4,
            "lr_factor": 0.5,
        }
        assert event["reason"].startswith(
            "training diverged: step 7: 3 optimizer steps in a row skipped"
        )
        steps = [s for s, _, _, _ in got["history"]]
        assert steps == list(range(1, 11))  # steps 5-7 replayed once, not duplicated
        lrs, clean_lrs = [h[2] for h in got["history"]], [h[2] for h in clean["history"]]
        assert lrs[:4] == clean_lrs[:4]
        assert lrs[4:] == pytest.approx([0.5 * lr for lr in clean_lrs[4:]], rel=1e-12)
        assert all(a for _, _, _, a in got["history"])  # the replay ran clean
        assert all(math.isfinite(loss) for _, loss, _, _ in got["history"])
        assert got["saved_lr_factor"] == 0.5  # a later resume keeps the lower LR


@pytest.mark.slow
def test_rollback_under_fp32_after_a_nan_loss(runs):
    results, _ = runs
    for r in results:
        got, clean = r["fp32_rollback"], r["fp32_clean"]
        assert got["error"] is None and got["step"] == 10
        (event,) = got["rollbacks"]
        assert (event["step"], event["to_step"], event["lr_factor"]) == (5, 4, 0.5)
        assert "non-finite loss or head gradient at step 5 (loss nan) under fp32" in event["reason"]
        # Up to the checkpoint the runs are one; after it only the LR differs.
        assert [h[1] for h in got["history"][:4]] == [h[1] for h in clean["history"][:4]]
        assert got["history"][4][1] == pytest.approx(clean["history"][4][1], rel=1e-6)


@pytest.mark.slow
def test_a_nan_loss_under_fp32_stops_naming_the_last_good_checkpoint(runs):
    results, tmp = runs
    for r in results:
        msg = r["fp32_stop"]["error"]
        assert msg.startswith(
            "training diverged: non-finite loss or head gradient at step 5 (loss nan) under fp32"
        )
        assert f"last good checkpoint: {tmp}/fp32_stop/checkpoints/step00000004 (" in msg
