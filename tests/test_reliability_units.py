"""Reliability pieces in one process, no DeepSpeed ranks: checksums and verification, tag
discovery and pruning, fault specs, the loss-scale guard, config ranges, pre-flight checks, the
second-signal exit and the watchdog (both in a subprocess: they end the process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from pfc_ds.train import checkpoint as ckpt
from pfc_ds.train import integrity, peers, preflight
from pfc_ds.train.config import ConfigError, load_config
from pfc_ds.train.divergence import ScaleGuard, nonfinite_weights
from pfc_ds.train.faults import Faults

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"

# ---- checksums and file records ---------------------------------------------------------------


def test_checksums_stream_in_blocks_and_match_one_shot(tmp_path, monkeypatch):
    import xxhash

    monkeypatch.setattr(integrity, "_BLOCK", 1000)  # many blocks and a partial last one
    data = os.urandom(12_345)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert integrity.checksum(path, "xxh3_64") == xxhash.xxh3_64(data).hexdigest()
    assert integrity.checksum(path, "crc32") == f"{zlib.crc32(data):08x}"
    with pytest.raises(ValueError, match="unknown checksum algorithm 'md5'"):
        integrity.checksum(path, "md5")


def test_a_missing_truncated_or_corrupt_file_is_named(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    path.write_bytes(bytes(range(256)) * 4)
    entry = integrity.record(path)
    assert entry == {
        "size": 1024,
        "algorithm": "xxh3_64",
        "checksum": integrity.checksum(path),
    }
    assert integrity.problem(tmp_path, path.name, entry) is None
    raw = bytearray(path.read_bytes())
    raw[500] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(raw))
    assert integrity.problem(tmp_path, path.name, entry) == (
        f"{path}: xxh3_64 {integrity.checksum(path)}, expected {entry['checksum']} (corrupt)"
    )
    path.write_bytes(bytes(raw[:1000]))
    assert integrity.problem(tmp_path, path.name, entry) == (
        f"{path}: 1000 bytes, expected 1024 (truncated)"
    )
    path.unlink()
    assert integrity.problem(tmp_path, path.name, entry) == f"{path}: missing"


# ---- tags: discovery, verification, pruning ---------------------------------------------------


def _tag(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / ckpt.CHECKPOINTS / ckpt.tag_for(step)
    folder.mkdir(parents=True)
    data = folder / "trainer_state_00000.pt"
    data.write_bytes(str(step).encode() * 100)
    if complete:
        meta = {"step": step, "files": {data.name: integrity.record(data)}}
        (folder / ckpt.META).write_text(json.dumps(meta))
    return folder


def test_candidates_are_complete_tags_newest_first_whatever_latest_says(tmp_path):
    for step in (5, 100, 20):
        _tag(tmp_path, step)
    _tag(tmp_path, 300, complete=False)  # a save cut short
    (tmp_path / ckpt.CHECKPOINTS / "step00000200.damaged").mkdir()
    (tmp_path / ckpt.CHECKPOINTS / ckpt.LATEST).write_text("step00000020\n")
    steps = [meta["step"] for _, meta in ckpt.candidates(tmp_path)]
    assert steps == [100, 20, 5]
    assert [p.name for p in ckpt.incomplete(tmp_path)] == ["step00000300"]
    assert ckpt.find_latest(tmp_path)[1]["step"] == 100
    assert ckpt.find_latest(tmp_path / "nothing") is None


def test_verify_names_the_damaged_file_and_set_aside_moves_the_tag(tmp_path):
    folder = _tag(tmp_path, 7)
    meta = json.loads((folder / ckpt.META).read_text())
    assert ckpt.verify(folder, meta) == []
    data = folder / "trainer_state_00000.pt"
    data.write_bytes(data.read_bytes()[:-1])
    assert ckpt.verify(folder, meta) == [f"{data}: 99 bytes, expected 100 (truncated)"]
    assert ckpt.verify(folder, {"step": 7}) == []  # format 1: no file list to check
    moved = ckpt.set_aside(folder)
    assert moved.name == "step00000007.damaged" and not folder.exists()
    assert ckpt.candidates(tmp_path) == []


def test_prune_keeps_the_newest_latest_and_protected_tags_and_drops_cut_short_saves(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _tag(tmp_path, step)
    _tag(tmp_path, 9, complete=False)
    root = tmp_path / ckpt.CHECKPOINTS
    (root / ckpt.LATEST).write_text("step00000002\n")  # latest names an older tag
    ckpt._prune(root, keep_last=2, keep={"step00000001"})  # e.g. the tag resumed from
    assert sorted(p.name for p in root.glob("step*")) == [
        "step00000001",
        "step00000002",
        "step00000004",
        "step00000005",
    ]
    ckpt._prune(root, keep_last=0, keep=set())  # keep_last 0 keeps everything
    assert len(list(root.glob("step*"))) == 4


def test_space_short_reports_the_rank_and_its_free_bytes(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5000, 5000))
    root = tmp_path / "out" / ckpt.CHECKPOINTS  # not created yet: its parent is asked
    assert ckpt.space_short(root, 4000) is None
    assert ckpt.space_short(root, 6000) == (0, 5000)
    assert ckpt.size_text(5000) == "5.0 KB" and ckpt.size_text(3.2e9) == "3.2 GB"


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
    faults.before_file(tmp_path / "trainer_state_00000.pt")
    with pytest.raises(OSError, match="No space left on device"):
        faults.before_file(tmp_path / "head_shard_00000_of_00001.pt")


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
    cfg = load_config(DEMO)
    meta = {"backbone": "tiny", "embedding_size": 128, "num_classes": 300}
    assert preflight.resume_mismatch(meta, tmp_path, cfg) is None
    assert preflight.resume_mismatch({**meta, "embedding_size": 64}, tmp_path, cfg) == (
        f"model.embedding_size=128 but the checkpoint {tmp_path} was trained with 64: set "
        "model.embedding_size: 64 to resume it, or use another train.output"
    )
    assert "data.num_classes=300 but the checkpoint" in preflight.resume_mismatch(
        {**meta, "num_classes": 1000}, tmp_path, cfg
    )
    assert "model.backbone='tiny' but the checkpoint" in preflight.resume_mismatch(
        {**meta, "backbone": "r50"}, tmp_path, cfg
    )


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
