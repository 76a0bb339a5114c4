"""The trainer's micro-step (backbone engine -> head -> loss -> backward -> both optimizer steps)
makes no host sync of its own between logging intervals, at W=2 with two micro-batches a step.

DeepSpeed's internals are its own business (under fp16 its overflow check is the one sync a step
needs); the audit counts only calls made from pfc_ds code, hooks included.
"""

from __future__ import annotations

import sys

import pytest

from tests.audit import SyncAudit
from tests.dist import run_distributed
from tests.trainer_helpers import cfg_dict, ds_config, make_trainer


class OwnSyncAudit(SyncAudit):
    """Counts only calls whose nearest caller outside torch is pfc_ds code."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None and "/torch/" in frame.f_code.co_filename:
            frame = frame.f_back
        if frame is None or "/pfc_ds/" not in frame.f_code.co_filename:
            return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def _worker(rank: int, world: int, tmp: str) -> dict:
    out = {}
    for stage, precision in ((0, "fp32"), (2, "bf16")):
        cfg = cfg_dict(
            head={"sample_rate": 0.5},
            data={"num_classes": 40},
            train={"grad_accum": 2, "max_steps": 4, "log_every": 1000},
        )
        tr = make_trainer(cfg, ds_config(stage, precision), f"{tmp}/{stage}")
        batches = iter(tr.loader)
        audit = OwnSyncAudit()
        with audit:
            for step in range(2):
                tr.lockstep.step([next(batches) for _ in range(2)], step)
        tr.lockstep.check()
        out[(stage, precision)] = audit.calls
    return out


@pytest.mark.slow
def test_trainer_micro_steps_make_no_host_sync(tmp_path):
    for result in run_distributed(_worker, 2, str(tmp_path)):
        assert result == {(0, "fp32"): [], (2, "bf16"): []}, result
