"""Reliability pieces in one process, no DeepSpeed ranks: fault specs, the loss-scale guard,
config ranges, pre-flight checks, the second-signal exit and the watchdog (both in a
subprocess: they end the process)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pfc_ds.train import peers, preflight
from pfc_ds.train.config import ConfigError, load_config
from pfc_ds.train.divergence import ScaleGuard, nonfinite_weights
from pfc_ds.train.faults import Faults

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"

# ---- fault specs ------------------------------------------------------------------------------


def test_fault_specs_select_rank_attempt_and_fire_each_step_once():
    spec = "hang:step=6,rank=1;nan:step=4,count=2;save_delay:2;kill:step=3,attempt=1"
    f0, f1 = Faults(spec, rank=0, attempt=0), Faults(spec, rank=1, attempt=0)
    assert [k for k, _ in f0.faults] == ["nan", "save_delay"]
    assert [k for k, _ in f1.faults] == ["hang", "nan", "save_delay"]
    assert [k for k, _ in Faults(spec, rank=0, attempt=1).faults] == ["kill"]  # a restart
    assert not Faults(None, rank=0)
    images = torch.ones(2, 3)
    assert torch.equal(f0.poison(images, 3), images)
    assert torch.isnan(f0.poison(images, 4)).all() and torch.isnan(f0.poison(images, 5)).all()
    assert torch.equal(f0.poison(images, 4), images)  # replayed after a rollback: clean
    assert torch.equal(f0.poison(images, 6), images)
    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        Faults("explode:step=1", rank=0)


def test_enospc_fault_raises_for_matching_files_only(tmp_path):
    faults = Faults("enospc:file=head_shard", rank=0, attempt=0)
    faults.before_file(tmp_path / "trainer_state_00000.pt", 2)
    with pytest.raises(OSError, match="No space left on device"):
        faults.before_file(tmp_path / "head_shard_00000_of_00001.pt", 2)
    at_step_4 = Faults("enospc:file=head_shard,step=4", rank=0, attempt=0)
    at_step_4.before_file(tmp_path / "head_shard_00000_of_00001.pt", 2)  # another step
    with pytest.raises(OSError, match="No space left on device"):
        at_step_4.before_file(tmp_path / "head_shard_00000_of_00001.pt", 4)


# ---- loss-scale guard and finite weights ------------------------------------------------------


def test_scale_guard_stops_after_the_consecutive_skips_and_keeps_the_history():
    guard = ScaleGuard(max_skips=3, min_scale=1.0)
    assert guard.record(1, True, 256.0) is None
    assert guard.record(2, False, 256.0) is None
    assert guard.record(3, True, 128.0) is None  # an applied step resets the streak
    assert guard.record(4, False, 128.0) is None
    assert guard.record(5, False, 64.0) is None
    reason = guard.record(6, False, 32.0)
    assert reason == (
        "step 6: 3 optimizer steps in a row skipped for non-finite gradients "
        "(train.max_consecutive_skips=3)"
    )
    assert guard.history_text() == (
        "loss scale 256 from step 1, 128 from step 3, 64 from step 5, 32 from step 6"
    )


def test_scale_guard_stops_at_an_overflow_at_the_minimum_scale():
    guard = ScaleGuard(max_skips=50, min_scale=64.0)
    assert guard.record(1, False, 128.0) is None
    assert guard.record(2, False, 64.0) == (
        "step 2: overflow at the minimum loss scale 64 (min_loss_scale), which cannot back off "
        "further"
    )
    assert ScaleGuard(max_skips=50, min_scale=None).record(1, False, 1.0) is None  # static
    assert ScaleGuard(5, None).history_text() == "no loss scale"


def test_nonfinite_weights_checks_every_tensor_once():
    good = [torch.zeros(3), torch.ones(2, 2, dtype=torch.float16), torch.arange(4)]
    assert not nonfinite_weights(good, torch.device("cpu"))
    bad = [*good, torch.tensor([1.0, float("inf")])]
    assert nonfinite_weights(bad, torch.device("cpu"))
    yes, no = torch.ones((), dtype=torch.bool), torch.zeros((), dtype=torch.bool)
    assert not nonfinite_weights(good, torch.device("cpu"), finite_flags=[yes])
    assert nonfinite_weights(good, torch.device("cpu"), finite_flags=[yes, no])
    assert not nonfinite_weights([], torch.device("cpu"))


# ---- config and pre-flight checks -------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.save_failure=ignore", "train.save_failure='ignore' is not allowed; allowed: error"),
        ("train.on_divergence=retry", "train.on_divergence='retry' is not allowed; allowed: stop"),
        ("train.collective_timeout_s=0", "train.collective_timeout_s must be > 0, got 0.0"),
        ("train.connect_timeout_s=-1", "train.connect_timeout_s must be > 0, got -1.0"),
        ("train.rollback_lr_factor=1.5", "train.rollback_lr_factor must be in (0, 1], got 1.5"),
        ("train.max_consecutive_skips=0", "train.max_consecutive_skips must be >= 1, got 0"),
        ("train.keep_last=-1", "train.keep_last must be >= 0, got -1"),
        ("train.save_every=-5", "train.save_every must be >= 0, got -5"),
        ("train.auto_resume=maybe", "train.auto_resume must be bool, got 'maybe'"),
        ("optim.momentum=1.0", "optim.momentum must be in [0, 1), got 1.0"),
        ("optim.betas=[0.9]", "optim.betas must be two values in [0, 1), got [0.9]"),
        ("head.scale=0", "head.scale must be > 0, got 0.0"),
        ("model.dropout=1", "model.dropout must be in [0, 1), got 1.0"),
    ],
)
def test_reliability_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert message in str(err.value)


def test_max_skipped_steps_is_still_read_as_max_consecutive_skips():
    assert load_config(DEMO).train.max_consecutive_skips == 50
    assert load_config(DEMO, ["train.max_skipped_steps=7"]).train.max_consecutive_skips == 7
    assert load_config(DEMO, ["train.max_consecutive_skips=9"]).train.max_consecutive_skips == 9
    with pytest.raises(
        ConfigError, match=r"max_skipped_steps=7 and train\.max_consecutive_skips=9"
    ):
        load_config(DEMO, ["train.max_skipped_steps=7", "train.max_consecutive_skips=9"])


def test_unwritable_output_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    problem = preflight.unwritable(blocker / "run")
    assert problem.startswith(f"train.output: {blocker / 'run'} is not writable (")
    assert "Not a directory" in problem or "File exists" in problem
    assert preflight.unwritable(tmp_path / "fresh" / "run") is None
    assert (tmp_path / "fresh" / "run").is_dir() and not list(
        (tmp_path / "fresh" / "run").iterdir()
    )


def test_train_sh_precheck_names_an_unwritable_output(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pfc_ds.train.cli", "--config", str(DEMO), "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert f"train.sh: error: train.output: {blocker / 'run'} is not writable" in proc.stderr


def test_resume_mismatch_names_key_and_checkpoint(tmp_path):
    from pfc_ds.checkpoint import CheckpointRef

    cfg = load_config(DEMO)
    meta = {"backbone": "tiny", "embedding_size": 128, "num_classes": 300}

    def mismatch(**changed):
        return preflight.resume_mismatch(CheckpointRef(tmp_path, {**meta, **changed}), cfg, 300)

    assert mismatch() is None
    assert mismatch(embedding_size=64) == (
        f"model.embedding_size=128 but the checkpoint {tmp_path} was trained with 64: set "
        "model.embedding_size: 64 to resume it, or use another train.output"
    )
    assert "data.num_classes=300 but the checkpoint" in mismatch(num_classes=1000)
    assert "model.backbone='tiny' but the checkpoint" in mismatch(backbone="r50")


def test_peer_failure_recognises_gloo_and_nccl_messages_only():
    for text in (
        "[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation",
        "[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234",
        "Application timeout caused pair closure",
        "NCCL communicator was aborted on rank 1",
    ):
        assert peers.is_peer_failure(RuntimeError(text)), text
    assert not peers.is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not peers.is_peer_failure(ValueError("Timed out"))
    assert peers.group_timeout("gloo", 60).total_seconds() == 60
    assert peers.grace_s(60) == 15 and peers.grace_s(8) == 10
    assert peers.group_timeout("nccl", 60).total_seconds() == 90  # after the watchdog's message


# ---- processes that end themselves ------------------------------------------------------------

_SECOND_SIGNAL = """
import os, signal, sys, time
from pfc_ds.train.stop import StopRequest
with StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGTERM)  # the first: a stop request, nothing more
    time.sleep(0.2)
    assert stop.signal_name == "SIGTERM"
    print("saving", flush=True)
    with stop.saving(12):
        time.sleep(30)  # a long checkpoint write; the test sends the second SIGTERM here
print("not reached", flush=True)
"""


def test_a_second_signal_during_a_save_exits_at_once():
    proc = subprocess.Popen(
        [sys.executable, "-c", _SECOND_SIGNAL],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "saving"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert time.monotonic() - sent < 2.0
    assert proc.returncode == 143
    assert "SIGTERM again while writing the checkpoint of step 12: exiting now without it; " in err
    assert "not reached" not in out


_WATCHDOG = """
import time
from pfc_ds.train.peers import Watchdog
with Watchdog(0.5, wait_s=0.1, grace=0.5) as dog:
    dog.beat("in step 3")
    time.sleep(30)
"""


def test_the_watchdog_ends_a_process_that_makes_no_progress():
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _WATCHDOG], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert time.monotonic() - start < 10
    assert proc.returncode == peers.EXIT_CODE
    assert "train.py: error: rank 0: no progress in step 3: " in proc.stderr
    assert "(the watchdog's limit: the timeout + 0.5 s)" in proc.stderr
