"""Helpers shared by the trainer tests (no tests here): tiny configs, DeepSpeed configs, and
functions that run a Trainer inside a `tests.dist.run_distributed` worker and return plain data.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {
    "model": {"backbone": "tiny", "embedding_size": 16, "options": {"width": 4}},
    "head": {"margin": [1.0, 0.0, 0.3], "scale": 16.0, "sample_rate": 1.0},
    "data": {"source": "synthetic", "num_classes": 10, "num_images": 512, "image_size": 32},
    "optim": {
        "name": "sgd",
        "lr": 0.2,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "warmup_epochs": 0.0,
    },
    "train": {
        "batch_size": 4,
        "grad_accum": 1,
        "max_steps": 5,
        "seed": 7,
        "log_every": 1,
        "save_every": 0,
        "keep_last": 0,
    },
}


def cfg_dict(**sections: dict[str, Any]) -> dict[str, Any]:
    """BASE with ``section={key: value}`` merged in."""
    out = copy.deepcopy(BASE)
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


def ds_config(stage: int, precision: str = "fp32", **extra: Any) -> dict[str, Any]:
    """A shipped ds_configs/zero{stage}_{precision}.json with top-level keys replaced."""
    with open(ROOT / "ds_configs" / f"zero{stage}_{precision}.json") as f:
        ds = json.load(f)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def make_trainer(cfg: dict, ds: dict, output: str | Path, *, resume: bool = False, **kw):
    """A built ``Trainer`` (``kw``: its other keyword arguments, e.g. ``faults``)."""
    import io

    from pfc_ds.train.config import Config
    from pfc_ds.train.loop import Trainer

    return Trainer(
        Config.from_dict(cfg),
        ds_config=ds,
        output=output,
        resume=resume,
        stream=io.StringIO(),
        **kw,
    )


def full_head(trainer) -> dict[str, torch.Tensor]:
    """The whole head (all ranks' shards, consolidated); collective."""
    from pfc_ds.head.reshard import consolidate

    shard = trainer.head.state_dict()
    if dist.is_initialized() and dist.get_world_size() > 1:
        shards: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shards, shard)
    else:
        shards = [shard]
    full = consolidate(shards)
    return {"weight": full["weight"], "momentum": full["momentum"]}


def snapshot(trainer) -> dict[str, Any]:
    """Losses so far, fp32 backbone and the full head; collective."""
    return {
        "losses": [h["loss"] for h in trainer.history],
        "lrs": [h["lr"] for h in trainer.history],
        "applied": [h["applied"] for h in trainer.history],
        "backbone": trainer.backbone_state(),
        "head": full_head(trainer),
    }


def train(
    cfg: dict, ds: dict, output: str | Path, *, stop_at: int | None = None, resume: bool = False
) -> dict[str, Any]:
    trainer = make_trainer(cfg, ds, output, resume=resume)
    trainer.fit(stop_at=stop_at)
    return snapshot(trainer)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_close_states(got: dict, want: dict, tol: float, what: str) -> None:
    for key, w in want["backbone"].items():
        if w.is_floating_point():
            err = rel_err(got["backbone"][key], w)
            assert err <= tol, f"{what}: backbone {key} rel err {err:.2e} > {tol}"
    for key in ("weight", "momentum"):
        w = want["head"][key]
        if w is None:
            assert got["head"][key] is None, f"{what}: head {key}"
            continue
        err = rel_err(got["head"][key], w)
        assert err <= tol, f"{what}: head {key} rel err {err:.2e} > {tol}"
    for i, (g, w) in enumerate(zip(got["losses"], want["losses"], strict=True)):
        assert abs(g - w) <= tol * abs(w), f"{what}: loss of step {i + 1}: {g} vs {w}"
