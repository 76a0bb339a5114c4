"""Every backbone family x {fp32, bf16, fp16} x ZeRO {0, 2, 3} through the real Trainer.

The production configs train BatchNorm backbones in half precision; a suite that trained only
``tiny`` in fp32 missed that every one of them crashed on step 1. Each cell here builds the
smallest member of a family from the shipped ``ds_configs/zero{stage}_{precision}.json`` and runs
two optimizer steps on 2 gloo ranks at 112 px, then checks a finite loss, that the fp32 master
weights of the backbone (every BatchNorm included) and the head moved, that BN running statistics
stayed fp32 and moved, and that both the engine's fp32 state and the checkpoint consolidated from
disk are the same weights and load strictly into a fresh backbone (insightface's key layout).

One launch per precision runs the cells of that precision. fp16 is refused by DeepSpeed on
a CPU, so its worker patches ``is_fp16_supported``. CPU fp16 convolution backward is a slow
reference kernel (about 25 s per iresnet18 micro-step of 2 images) and ViT's fp16 matmuls take
about 10 s a step, so iresnet18 (at batch 2) and vit_t run fp16 at ZeRO-2 only; fp16 at ZeRO-0 and
-3 is covered by mbf (BatchNorms included) and tiny. bf16 is as slow on a CPU without native
bf16 (AVX2 only: an iresnet18 step of 8 images took 17 s against 2.3 s in fp32, measured
2026-12-06), so it follows the same rule.
Batch 2 is too small elsewhere: a BatchNorm over 1x1 maps then gives each channel exactly +-x, so
the next bias-free layer's batch mean is exactly 0 in fp16 and its running mean cannot move.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_distributed
from tests.trainer_helpers import cfg_dict, ds_config, full_head, make_trainer

FAMILIES = ("r18", "mbf", "vit_t", "tiny")  # the smallest member of each registered family
STAGES = (0, 2, 3)
PRECISIONS = ("fp32", "bf16", "fp16")
SLOW_HALF = ("r18", "vit_t")  # CPU half kernels too slow for every stage (see above)


def _cell(backbone: str, stage: int, precision: str, out: str) -> dict:
    cfg = cfg_dict(
        model={"backbone": backbone, "embedding_size": 32, "options": {}},
        data={"num_classes": 24, "num_images": 64, "image_size": 112},
        head={"sample_rate": 0.5},
        optim={"lr": 0.05},
        train={"batch_size": 2 if (precision, backbone) == ("fp16", "r18") else 4, "max_steps": 2},
    )
    ds = ds_config(stage, precision)
    if precision == "fp16":
        ds["fp16"] = {**ds["fp16"], "initial_scale_power": 8}
    tr = make_trainer(cfg, ds, out)
    before = tr.backbone_state()
    head_before = full_head(tr)["weight"].clone()
    zero_init = sorted(n for n, v in before.items() if v.is_floating_point() and not v.any())
    bn_dtypes = {n: b.dtype for n, b in tr.engine.module.named_buffers() if b.is_floating_point()}
    tr.fit()
    after = tr.backbone_state()
    moved = sorted(
        n for n, v in after.items() if v.is_floating_point() and not torch.equal(v, before[n])
    )
    trainable = sorted(n for n, p in tr.engine.module.named_parameters() if p.requires_grad)
    from pfc_ds.backbones import get_backbone
    from pfc_ds.checkpoint import consolidated_backbone, open_checkpoint

    get_backbone(backbone, 32).load_state_dict(after, strict=True)
    # The checkpoint consolidates to the same fp32 weights (what tools.backbone writes).
    ref = open_checkpoint(out)
    consolidated = consolidated_backbone(ref) if dist.get_rank() == 0 else after
    get_backbone(backbone, 32).load_state_dict(consolidated, strict=True)
    differ = sorted(k for k, v in after.items() if not torch.equal(consolidated[k], v))
    return {
        "losses": [h["loss"] for h in tr.history],
        "applied": [h["applied"] for h in tr.history],
        "moved": moved,
        "zero_init": zero_init,
        "trainable": trainable,
        "buffers": sorted(n for n in bn_dtypes if "running" in n),
        "buffer_dtypes": sorted({str(d) for d in bn_dtypes.values()}),
        "finite": all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point()),
        "head_moved": not torch.equal(full_head(tr)["weight"], head_before),
        "param_dtype": str(next(tr.engine.module.parameters()).dtype),
        "consolidated_differs": differ,
    }


def _worker(rank: int, world: int, precision: str, tmp: str) -> dict:
    if precision == "fp16":
        from deepspeed.accelerator import get_accelerator

        get_accelerator().is_fp16_supported = lambda: True
    return {
        (b, s): _cell(b, s, precision, f"{tmp}/{precision}_{b}_z{s}")
        for b in FAMILIES
        for s in STAGES
        if not (precision != "fp32" and b in SLOW_HALF and s != 2)
    }


@pytest.fixture(scope="module", params=PRECISIONS)
def runs(request, tmp_path_factory):
    precision = request.param
    return precision, run_distributed(
        _worker, 2, precision, str(tmp_path_factory.mktemp(precision))
    )


def _problems(precision: str, cell: tuple, r: dict, other: dict) -> list[str]:
    want_dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
    out = []
    if len(r["losses"]) != 2 or not all(math.isfinite(x) for x in r["losses"]):
        out.append(f"losses {r['losses']}")
    if r["losses"] != other["losses"]:
        out.append(f"ranks disagree: {r['losses']} vs {other['losses']}")
    if not r["applied"][-1]:
        out.append(f"last step skipped {r['applied']}")
    if not r["finite"]:
        out.append("non-finite weights")
    if not r["head_moved"]:
        out.append("head did not move")
    if r["param_dtype"] != want_dtype[precision]:
        out.append(f"engine parameters are {r['param_dtype']}")
    # Every trainable parameter moved (BN affine ones included), and every running statistic.
    # Under fp16 a zero-initialised bias may see its scaled gradient underflow to 0 in 2 steps.
    still = sorted(set(r["trainable"]) - set(r["moved"]))
    if precision == "fp16":
        still = [n for n in still if not (n.endswith(".bias") and n in r["zero_init"])]
    if still:
        out.append(f"parameters that did not move: {still}")
    stuck = sorted(set(r["buffers"]) - set(r["moved"]))
    if stuck:
        out.append(f"BN statistics that did not move: {stuck}")
    # BN statistics stay fp32 (num_batches_tracked is int64, not floating).
    if r["consolidated_differs"]:
        out.append(f"checkpoint consolidates to other weights: {r['consolidated_differs'][:5]}")
    if r["buffer_dtypes"] not in ([], ["torch.float32"]):
        out.append(f"buffers are {r['buffer_dtypes']}")
    return [f"{cell[0]} {precision} ZeRO-{cell[1]}: {p}" for p in out]


@pytest.mark.slow
def test_every_family_trains_at_every_precision_and_stage(runs):
    precision, results = runs
    problems = [
        p for cell, r in results[0].items() for p in _problems(precision, cell, r, results[1][cell])
    ]
    assert not problems, "\n".join(problems)
