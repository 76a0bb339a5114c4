"""Damaged checkpoints, full disks and bad resumes on 2 in-process ranks (fp32, ZeRO-0).

One reference run saves steps 2, 4 and 6. Copies of it then get one fault each:

* a truncated head shard row file of rank 1, a flipped byte in DeepSpeed's model file, a tag
  without ``meta.json``: the resume names the file (or the cut-short save), sets the tag aside,
  resumes step 4, and its steps 5-6 repeat the reference losses exactly;
* free space below the last checkpoint's size (``shutil.disk_usage`` patched), and ENOSPC while a
  head shard is written: the save fails with a message on every rank, no partial tag is left,
  the previous tags still verify; ``train.save_failure: warn`` trains on to the end;
* a NaN weight planted right before a save: nothing is written and the run stops naming the last
  good checkpoint;
* a resume with another embedding size or class count: one error naming the key; at another
  world size: the global-batch warning; and the setup-time disk check;
* pruning with ``keep_last: 1`` keeps the tag the run resumed from.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_distributed
from tests.trainer_helpers import cfg_dict, ds_config, make_trainer

CFG = cfg_dict(train={"max_steps": 6, "save_every": 2, "keep_last": 0, "log_every": 1})
Usage = namedtuple("Usage", "total used free")


def _capture() -> list[str]:
    records: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("pfc_ds")
    logger.setLevel(logging.INFO)
    logger.addHandler(Catch())
    return records


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.history}


def _damage(folder: Path, case: str) -> str:
    """Damage the step-6 tag of ``folder``; the file named in the expected message."""
    tag = folder / "checkpoints" / "step00000006"
    if case == "truncated_head_shard":
        path = tag / "head_shard_00001_of_00002.pt.weight.bin"
        path.write_bytes(path.read_bytes()[:-7])
    elif case == "corrupt_deepspeed_file":
        path = tag / "mp_rank_00_model_states.pt"
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        path.write_bytes(bytes(raw))
    else:  # a save cut short: every file, but no meta.json
        path = tag / "meta.json"
        path.unlink()
    return path.name


CASES = ("truncated_head_shard", "corrupt_deepspeed_file", "cut_short")


def _damaged(rank: int, world: int, tmp: str) -> dict:
    log = _capture()
    ref = make_trainer(CFG, ds_config(0), f"{tmp}/ref")
    ref.fit()
    out = {"ref": _losses(ref), "estimate": ref.checkpointer.estimated}
    meta = json.loads(Path(f"{tmp}/ref/checkpoints/step00000002/meta.json").read_text())
    out["first_size"] = meta["bytes"]
    for case in CASES:
        if rank == 0:
            shutil.copytree(f"{tmp}/ref", f"{tmp}/{case}")
            out[case + "_file"] = _damage(Path(f"{tmp}/{case}"), case)
        dist.barrier()
        log.clear()
        tr = make_trainer(CFG, ds_config(0), f"{tmp}/{case}", resume=True)
        resumed_at = tr.step
        tr.fit()
        out[case] = {
            "resumed_at": resumed_at,
            "losses": _losses(tr),
            "log": list(log),
            "tags": sorted(p.name for p in Path(f"{tmp}/{case}/checkpoints").glob("step*")),
        }
    # keep_last 1 after resuming step 4 (step 6 cut short): the resumed tag survives the prune.
    if rank == 0:
        shutil.copytree(f"{tmp}/ref", f"{tmp}/keep_one")
        _damage(Path(f"{tmp}/keep_one"), "cut_short")
    dist.barrier()
    keep_one = cfg_dict(**{**CFG, "train": {**CFG["train"], "keep_last": 1}})
    make_trainer(keep_one, ds_config(0), f"{tmp}/keep_one", resume=True).fit()
    out["keep_one"] = sorted(p.name for p in Path(f"{tmp}/keep_one/checkpoints").glob("step*"))
    return out


def _resume_w1(rank: int, world: int, tmp: str) -> dict:
    """The damaged run's output, resumed at world size 1 with the same per-rank batch."""
    log = _capture()
    tr = make_trainer(CFG, ds_config(0), f"{tmp}/truncated_head_shard", resume=True)
    return {"step": tr.step, "log": list(log)}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("damaged"))
    out = run_distributed(_damaged, 2, tmp)
    out.append(run_distributed(_resume_w1, 1, tmp)[0])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_damaged_tag_is_named_set_aside_and_the_previous_one_resumed(damaged, case):
    for rank in (0, 1):
        got = damaged[rank][case]
        assert got["resumed_at"] == 4
        # Steps 5 and 6 repeat the uninterrupted run bit for bit.
        assert {s: got["losses"][s] for s in (5, 6)} == {s: damaged[rank]["ref"][s] for s in (5, 6)}
    log = "\n".join(damaged[0][case]["log"])
    name = damaged[0][case + "_file"]
    if case == "cut_short":
        assert "step00000006 has no meta.json (a save cut short); not resuming it" in log
        assert damaged[0][case]["tags"] == ["step00000002", "step00000004", "step00000006"]
    else:
        kind = "truncated" if case == "truncated_head_shard" else "corrupt"
        assert "checkpoint step00000006 is damaged: " in log
        assert f"step00000006/{name}: " in log and f"({kind}); set aside as" in log
        assert "step00000006.damaged, trying the previous one" in log
        # The set-aside tag is kept for a look; step 6 was saved anew.
        assert damaged[0][case]["tags"] == [
            "step00000002",
            "step00000004",
            "step00000006",
            "step00000006.damaged",
        ]
    assert "resumed from" in log and "step00000004 at step 4" in log


@pytest.mark.slow
def test_pruning_keeps_the_tag_resumed_from(damaged):
    # keep_last 1: step 6 is the newest; step 4, resumed from, stays; step 2 and the cut-short
    # step-6 leftovers are gone (step 6 was written anew).
    assert damaged[0]["keep_one"] == ["step00000004", "step00000006"]


@pytest.mark.slow
def test_the_setup_estimate_of_a_checkpoint_is_close_to_its_size(damaged):
    est, real = damaged[0]["estimate"], damaged[0]["first_size"]
    assert 0.8 * real <= est <= 1.5 * real, (est, real)


@pytest.mark.slow
def test_resume_at_another_world_size_warns_of_the_global_batch(damaged):
    w1 = damaged[2]
    assert w1["step"] == 6
    assert any(
        "resume changes the global batch 8 -> 4 (world size 2 -> 1" in m for m in w1["log"]
    ), w1["log"]


# ---- full disk, ENOSPC, non-finite weights, bad resumes ----------------------------------------


def _disk(rank: int, world: int, tmp: str) -> dict:
    from pfc_ds.checkpoint import CheckpointError, open_checkpoint
    from pfc_ds.checkpoint.reader import verify
    from pfc_ds.train.divergence import DivergenceError
    from pfc_ds.train.faults import Faults

    log = _capture()
    real_usage = shutil.disk_usage
    out = {}

    def full_after_step_2(trainer):
        def on_step(step):
            if step == 3:  # step 2's checkpoint is written: now the disk is (nearly) full
                shutil.disk_usage = lambda p: Usage(10**9, 10**9 - 4096, 4096)

        return on_step

    for mode in ("error", "warn"):
        cfg = cfg_dict(**{**CFG, "train": {**CFG["train"], "save_failure": mode}})
        tr = make_trainer(cfg, ds_config(0), f"{tmp}/full_{mode}")
        log.clear()
        try:
            tr.fit(on_step=full_after_step_2(tr))
            error = None
        except CheckpointError as exc:
            error = str(exc)
        finally:
            shutil.disk_usage = real_usage
        ref = open_checkpoint(f"{tmp}/full_{mode}")
        out[mode] = {
            "error": error,
            "step": tr.step,
            "log": list(log),
            "tags": sorted(p.name for p in Path(f"{tmp}/full_{mode}/checkpoints").glob("step*")),
            "latest": Path(f"{tmp}/full_{mode}/checkpoints/latest").read_text().strip(),
            "verify": verify(ref),
            "backbone": Path(f"{tmp}/full_{mode}/backbone.pt").is_file(),
        }

    # ENOSPC on rank 1 while its head shard of step 4 is written.
    faults = Faults("enospc:file=head_shard,rank=1,step=4", rank=rank, attempt=0)
    tr = make_trainer(CFG, ds_config(0), f"{tmp}/enospc", faults=faults)
    try:
        tr.fit()
        out["enospc"] = None
    except CheckpointError as exc:
        out["enospc"] = str(exc)
    out["enospc_tags"] = sorted(p.name for p in Path(f"{tmp}/enospc/checkpoints").glob("step*"))

    # A NaN weight planted after step 4 ran, before its checkpoint: never written.
    tr = make_trainer(CFG, ds_config(0), f"{tmp}/nan_weight")

    def plant(step):  # through the bank, as every write to it goes
        if step == 4 and rank == 1:
            nan = torch.full((1, tr.head.embedding_size), float("nan"))
            tr.head.bank.apply_update(torch.tensor([0]), nan, None)

    try:
        tr.fit(on_step=plant)
        out["nan_weight"] = None
    except DivergenceError as exc:
        out["nan_weight"] = str(exc)
    out["nan_tags"] = sorted(p.name for p in Path(f"{tmp}/nan_weight/checkpoints").glob("step*"))

    # Resume with another embedding size or class count: one error naming the key.
    for key, value in (("model", {"embedding_size": 32}), ("data", {"num_classes": 12})):
        cfg = cfg_dict(**{**CFG, key: {**CFG[key], **value}})
        try:
            make_trainer(cfg, ds_config(0), f"{tmp}/enospc", resume=True)
            out[f"mismatch_{key}"] = None
        except Exception as exc:
            out[f"mismatch_{key}"] = f"{type(exc).__name__}: {exc}"

    # Before the first step: no room for one checkpoint. A run that never saves (the
    # profiler's) needs none and trains.
    shutil.disk_usage = lambda p: Usage(10**9, 10**9 - 1000, 1000)
    try:
        tr = make_trainer(CFG, ds_config(0), f"{tmp}/no_room")
        try:
            tr.fit()
            out["no_room"] = None
        except CheckpointError as exc:
            out["no_room"] = str(exc)
        out["no_room_step"] = tr.step
        out["no_save_steps"] = len(tr.fit(stop_at=2, save=False))
    finally:
        shutil.disk_usage = real_usage
    return out


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disk")
    return run_distributed(_disk, 2, str(tmp)), tmp


@pytest.mark.slow
def test_a_full_disk_fails_the_save_cleanly_and_keeps_the_previous_tags(disk):
    runs, tmp = disk
    for rank in (0, 1):
        got = runs[rank]["error"]
        assert got["step"] == 4
        assert got["error"].startswith(
            f"checkpoint of step 4 not written: 4.1 KB free on {tmp}/full_error/checkpoints "
            "(rank 0), the last checkpoint took "
        )
        assert (
            "; free disk space or lower train.keep_last; the previous checkpoint " in got["error"]
        )
        assert got["error"].endswith("step00000002 is intact (train.save_failure: warn trains on)")
        assert got["tags"] == ["step00000002"] and got["latest"] == "step00000002"
        assert got["verify"] == []


@pytest.mark.slow
def test_save_failure_warn_trains_on_to_the_end(disk):
    runs, _ = disk
    got = runs[0]["warn"]
    assert got["error"] is None and got["step"] == 6 and got["backbone"]
    assert got["tags"] == ["step00000002"] and got["latest"] == "step00000002"
    assert got["verify"] == []
    warned = [m for m in got["log"] if "training on (train.save_failure: warn)" in m]
    assert [m.split(" not written")[0] for m in warned] == [
        "checkpoint of step 4",
        "checkpoint of step 6",
    ]


@pytest.mark.slow
def test_enospc_mid_write_fails_every_rank_and_leaves_no_partial_tag(disk):
    runs, _ = disk
    for rank in (0, 1):
        msg = runs[rank]["enospc"]
        assert msg.startswith("checkpoint of step 4 not written: rank 1: OSError: [Errno 28] No ")
        assert "head_shard_00001_of_00002.pt" in msg
        assert runs[rank]["enospc_tags"] == ["step00000002"]


@pytest.mark.slow
def test_non_finite_weights_are_never_saved(disk):
    runs, tmp = disk
    for rank in (0, 1):
        msg = runs[rank]["nan_weight"]
        assert msg.startswith(
            "training diverged: step 4: non-finite weights found before the checkpoint; "
            "no loss scale; last good checkpoint: "
        )
        assert f"{tmp}/nan_weight/checkpoints/step00000002 (resume it with --resume" in msg
        assert runs[rank]["nan_tags"] == ["step00000002"]


@pytest.mark.slow
def test_resume_with_another_head_shape_is_one_error_naming_the_key(disk):
    runs, tmp = disk
    folder = f"{tmp}/enospc/checkpoints/step00000002"
    assert runs[0]["mismatch_model"] == (
        f"ConfigError: model.embedding_size=32 but the checkpoint {folder} was trained with 16: "
        "set model.embedding_size: 16 to resume it, or use another train.output"
    )
    assert runs[1]["mismatch_data"].startswith(
        f"ConfigError: data.num_classes=12 but the checkpoint {folder} was trained with 10"
    )


@pytest.mark.slow
def test_no_room_for_one_checkpoint_is_found_before_any_step(disk):
    runs, tmp = disk
    msg = runs[0]["no_room"]
    assert msg.startswith(
        f"train.output: 1.0 KB free on {tmp}/no_room/checkpoints (rank 0), one checkpoint needs "
        "about "
    )
    assert msg.endswith("(train.save_failure: warn trains on without saving)")
    assert runs[0]["no_room_step"] == 0
    assert runs[0]["no_save_steps"] == 2
