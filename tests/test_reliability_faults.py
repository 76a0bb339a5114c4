"""Faults injected into real 2-rank launches of ``train.py`` (issue 12's fault tests).

The ranks are started directly (``RANK``/``WORLD_SIZE`` per process, as on two nodes: no
launcher kills the survivor for us) or under ``torchrun --max-restarts 1``. Faults come from
``PFC_DS_FAULT`` (``pfc_ds/train/faults.py``). Every run is fp32 on CPU, so a resumed run must
repeat the uninterrupted reference run bit for bit. Each test also checks the bookkeeping of the
issue's figure: steps lost == steps since the last complete checkpoint, checkpoints lost == 0;
with ``PFC_DS_FAULT_REPORT=FILE`` each test appends its numbers to FILE.

* kill -9 of rank 1 while it writes the checkpoint of step 10 (files delayed 1.5 s apart): the
  survivor exits within the timeout naming the step and rank 1; the tag has no ``meta.json``;
  ``--resume`` takes step 5 and steps 6-12 equal the reference.
* kill -9 of rank 1 at step 11 under ``torchrun --max-restarts 1`` with ``train.auto_resume``:
  the job restarts, resumes step 8 by itself and ends with the reference's weights.
* rank 1 hangs at step 6: rank 0 exits within the 5 s timeout + 5 s naming step 6 and rank 1;
  the hung rank's watchdog ends it too; ``--resume`` repeats the reference from step 5.
* SIGTERM, then SIGTERM again during the stop's checkpoint: both ranks exit at once, the previous
  checkpoint intact, and ``--resume`` takes it.
* a real full disk (a tmpfs in a private mount namespace, ``unshare -rm``): the second save
  fails cleanly, the first still verifies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pfc_ds.checkpoint import layout, open_checkpoint
from pfc_ds.checkpoint.reader import verify
from pfc_ds.checkpoint.shard_files import load_shard
from tests.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SETS = {
    "train.batch_size": 16,
    "data.image_size": 32,
    "eval.synthetic_pairs": 0,
    "eval.every": 0,
    "train.max_steps": 12,
    "train.save_every": 5,
    "train.keep_last": 0,
}


def _args(out: Path, *extra: str, **sets) -> list[str]:
    pairs = {**SETS, **sets}
    args = ["train.py", "--config", "configs/demo_cpu.yaml"]
    args += ["--deepspeed_config", "ds_configs/cpu.json", "--output", str(out), "--log-every", "1"]
    for key, value in pairs.items():
        args += ["--set", f"{key}={value}"]
    return [*args, *extra]


def _env(fault: str | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("PFC_DS_FAULT", None)
    if fault:
        env["PFC_DS_FAULT"] = fault
    return env


def _direct(out: Path, *extra: str, fault: str | None = None, **sets) -> list[subprocess.Popen]:
    """Two ranks as two independent processes (logs in ``out/../<name>.rankR.log``)."""
    port, procs = free_port(), []
    for rank in (0, 1):
        env = _env(fault)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(_log_path(out, rank), "a")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [PY, *_args(out, *extra, **sets)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return procs


def _log_path(out: Path, rank: int) -> Path:
    return out.parent / f"{out.name}.rank{rank}.log"


def _log(out: Path, rank: int) -> str:
    return _log_path(out, rank).read_text()


def _wait_ok(procs: list[subprocess.Popen], out: Path, timeout: float = 240) -> None:
    for rank, p in enumerate(procs):
        rc = p.wait(timeout=timeout)
        assert rc == 0, f"rank {rank} exit {rc}:\n{_log(out, rank)[-3000:]}"


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _losses(records: list[dict]) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs its steps again)."""
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _wait_for(predicate, procs: list[subprocess.Popen], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            assert p.poll() is None, f"a rank ended (exit {p.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _fault_time(log: str, what: str) -> float:
    return float(re.search(rf"pfc_ds fault: rank \d {what}.* t=([\d.]+)", log).group(1))


def _report(**row) -> None:
    """Append one fault's numbers to ``$PFC_DS_FAULT_REPORT`` (JSON lines), when it is set."""
    path = os.environ.get("PFC_DS_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _intact(out: Path, step: int) -> bool:
    ref = open_checkpoint(out / "checkpoints" / layout.tag_for(step))
    return verify(ref) == [] and len(ref.meta["files"]) == 9


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: 12 steps, checkpoints at 5, 10 and 12."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    procs = _direct(out)
    try:
        _wait_ok(procs, out)
    finally:
        _kill_all(procs)
    return out


@pytest.mark.slow
def test_kill_one_rank_mid_checkpoint_then_resume_repeats_the_reference(reference):
    out = reference.parent / "kill_mid_save"
    timeout = 20
    procs = _direct(
        out, fault="save_delay:seconds=1.5,step=10", **{"train.collective_timeout_s": timeout}
    )
    try:
        rank1_file = out / "checkpoints/step00000010/head_shard_00001_of_00002.pt.weight.bin"
        _wait_for(rank1_file.exists, procs, 240, "rank 1 writing the checkpoint of step 10")
        os.kill(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        rc = procs[0].wait(timeout=timeout + 30)
        survivor_s = time.monotonic() - killed
    finally:
        _kill_all(procs)
    log = _log(out, 0)
    assert rc == 75, log[-3000:]
    assert survivor_s < timeout, survivor_s
    assert (
        "train.py: error: rank 0: a collective failed in the checkpoint of step 10: rank(s) [1] "
        "did not respond (dead or hung); train.collective_timeout_s=20. " in log
    ), log[-3000:]
    reached = max(_losses(_records(out)))
    assert reached == 10
    assert not (out / "checkpoints/step00000010/meta.json").exists()
    assert (out / "checkpoints/latest").read_text().strip() == "step00000005"
    assert _intact(out, 5)  # checkpoints lost: 0

    procs = _direct(out, "--resume")
    try:
        _wait_ok(procs, out)
    finally:
        _kill_all(procs)
    log = _log(out, 0)
    assert "step00000010 has no meta.json (a save cut short); not resuming it" in log
    assert re.search(r"resumed from \S+/step00000005 at step 5 ", log), log[-3000:]
    steps_lost = reached - 5
    assert steps_lost == 10 - 5  # exactly the steps since the last complete checkpoint
    got, want = _losses(_records(out)), _losses(_records(reference))
    assert {s: got[s] for s in range(6, 13)} == {s: want[s] for s in range(6, 13)}
    assert _intact(out, 10) and _intact(out, 12)
    _report(
        fault="kill -9 of rank 1 mid-checkpoint (step 10)",
        reached=reached,
        resumed_from=5,
        steps_lost=steps_lost,
        checkpoints_lost=0,
        survivor_exit_s=round(survivor_s, 1),
        timeout_s=timeout,
    )


@pytest.mark.slow
def test_torchrun_restarts_after_a_kill_and_resumes_by_itself(reference):
    out = reference.parent / "torchrun_restart"
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1"]
    cmd += ["--master_port", str(free_port()), "--monitor-interval", "0.5"]
    cmd += _args(out, **{"train.auto_resume": "true", "train.save_every": 4})
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=_env("kill:step=11,rank=1"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "pfc_ds fault: rank 1 kill -9 at step 11" in log
    assert re.search(r"resumed from \S+/step00000008 at step 8 ", log), log[-4000:]
    records = _records(out)
    restart = next(i for i, r in enumerate(records) if i and r["step"] <= records[i - 1]["step"])
    reached, resumed = records[restart - 1]["step"], records[restart]["step"] - 1
    assert (reached, resumed) == (10, 8)  # steps lost: 2 == steps since the checkpoint of 8
    # The same final weights as the uninterrupted run, bit for bit.
    got = torch.load(out / "backbone.pt", weights_only=True)
    want = torch.load(reference / "backbone.pt", weights_only=True)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    for rank in (0, 1):
        name = f"checkpoints/step00000012/head_shard_{rank:05d}_of_00002.pt"
        a, b = load_shard(out / name), load_shard(reference / name)
        assert torch.equal(a["weight"], b["weight"]) and torch.equal(a["momentum"], b["momentum"])
    assert all(_intact(out, s) for s in (4, 8, 12))
    _report(
        fault="kill -9 of rank 1 mid-step (step 11), torchrun --max-restarts 1",
        reached=reached,
        resumed_from=resumed,
        steps_lost=reached - resumed,
        checkpoints_lost=0,
    )


@pytest.mark.slow
def test_a_hung_rank_ends_the_survivor_within_the_timeout(reference):
    out = reference.parent / "hung"
    timeout = 5
    procs = _direct(out, fault="hang:step=6,rank=1", **{"train.collective_timeout_s": timeout})
    try:
        rc0 = procs[0].wait(timeout=180)
        survivor_end = time.time()
        rc1 = procs[1].wait(timeout=60)
        hung_end = time.time()
    finally:
        _kill_all(procs)
    log0, log1 = _log(out, 0), _log(out, 1)
    hang = _fault_time(log1, "hangs at step 6")
    assert rc0 == 75, log0[-3000:]
    assert survivor_end - hang < timeout + 5, survivor_end - hang
    assert (
        "train.py: error: rank 0: a collective failed in step 6: rank(s) [1] did not respond "
        "(dead or hung); train.collective_timeout_s=5. [" in log0
    ), log0[-3000:]
    assert "Timed out waiting 5000ms" in log0
    # The hung rank ends itself too: its watchdog fires at the timeout + 10 s.
    assert rc1 == 75, log1[-3000:]
    assert hung_end - hang < timeout + 10 + 5, hung_end - hang
    assert "train.py: error: rank 1: no progress in step 6: " in log1
    reached = max(_losses(_records(out)))
    assert reached == 5
    assert _intact(out, 5)

    procs = _direct(out, "--resume")
    try:
        _wait_ok(procs, out)
    finally:
        _kill_all(procs)
    assert re.search(r"resumed from \S+/step00000005 at step 5 ", _log(out, 0))
    got, want = _losses(_records(out)), _losses(_records(reference))
    assert {s: got[s] for s in range(6, 13)} == {s: want[s] for s in range(6, 13)}
    _report(
        fault="rank 1 hangs (step 6)",
        reached=reached,
        resumed_from=5,
        steps_lost=reached - 5,
        checkpoints_lost=0,
        survivor_exit_s=round(survivor_end - hang, 1),
        hung_rank_exit_s=round(hung_end - hang, 1),
        timeout_s=timeout,
    )


@pytest.mark.slow
def test_a_second_sigterm_during_the_stop_checkpoint_exits_at_once(reference):
    out = reference.parent / "sigterm_twice"
    long_run = {"train.max_steps": 200, "train.save_every": 0}
    procs = _direct(out, "--max-steps", "3", **long_run)
    try:
        _wait_ok(procs, out)
    finally:
        _kill_all(procs)
    assert _intact(out, 3)

    procs = _direct(out, "--resume", fault="save_delay:seconds=2", **long_run)
    try:
        _wait_for(lambda: max(_losses(_records(out))) >= 6, procs, 240, "step 6")
        for p in procs:
            p.send_signal(signal.SIGTERM)

        def saving() -> bool:
            return any(s > 3 for s, _ in layout.tags(out / "checkpoints"))

        _wait_for(saving, procs, 60, "the stop's checkpoint")
        for p in procs:
            p.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        rcs = [p.wait(timeout=30) for p in procs]
        exit_s = time.monotonic() - sent
    finally:
        _kill_all(procs)
    assert rcs == [143, 143], rcs
    assert exit_s < 3, exit_s
    log = _log(out, 0)
    step = int(re.search(r"SIGTERM again while writing the checkpoint of step (\d+): ", log)[1])
    assert step >= 6
    assert "exiting now without it; the previous checkpoint is intact" in log
    assert not (out / "checkpoints" / layout.tag_for(step) / layout.META).exists()
    assert (out / "checkpoints/latest").read_text().strip() == "step00000003"
    assert _intact(out, 3)
    reached = max(_losses(_records(out)))

    procs = _direct(out, "--resume", "--max-steps", "4", **long_run)
    try:
        _wait_ok(procs, out)
    finally:
        _kill_all(procs)
    assert re.search(r"resumed from \S+/step00000003 at step 3 ", _log(out, 0))
    _report(
        fault="SIGTERM, then SIGTERM again during the stop's checkpoint",
        reached=reached,
        resumed_from=3,
        steps_lost=reached - 3,
        checkpoints_lost=0,
        exit_after_second_signal_s=round(exit_s, 2),
    )


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.slow
def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(reference, tmp_path):
    if not _can_mount_tmpfs():
        pytest.skip("no unprivileged mount namespace here (unshare -rm)")
    size = json.loads((reference / "checkpoints/step00000005/meta.json").read_text())["bytes"]
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    copy.mkdir()
    out = mnt / "run"
    port = free_port()
    launcher = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    train = " ".join([*launcher, "--master_port", str(port), *_args(out)])
    # Room for the first checkpoint (and the logs), not for a second one beside it.
    script = (
        f"mount -t tmpfs -o size={int(size * 1.6) // 1024}k tmpfs {mnt} && "
        f"{train}; rc=$?; cp -a {mnt}/. {copy}/; exit $rc"
    )
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert (
        "train.py: error: checkpoint of step 10 not written: " in log
        and f" free on {out}/checkpoints (rank 0), the last checkpoint took " in log
        and f"the previous checkpoint {out}/checkpoints/step00000005 is intact" in log
    ), log[-3000:]
    kept = copy / "run"
    assert sorted(p.name for p in (kept / "checkpoints").glob("step*")) == ["step00000005"]
    assert (kept / "checkpoints/latest").read_text().strip() == "step00000005"
    assert _intact(kept, 5)
    _report(
        fault="disk full (tmpfs of 1.6 checkpoints) at the save of step 10",
        reached=10,
        resumed_from=None,
        steps_lost=10 - 5,
        checkpoints_lost=0,
    )
