"""World-size equivalence at every ZeRO stage, gradient accumulation, LR and clipping.

Issue tests 1 and 4. fp32, sample rate 1, the tiny backbone (no batch statistics). One W=1 and
one W=2 process group run every configuration back to back, so the suite pays two launches.

* W=2 ranks x batch b reproduce W=1 x batch 2b at ZeRO 0, 1, 2 and 3: per-step loss, backbone
  and head (weight and momentum) within 1e-4 relative.
* W=1 under DeepSpeed reproduces a plain-torch loop (torch SGD, ``clip_grad_norm_``, SparseSGD,
  the same LR per optimizer step) within 1e-5: clipping binds on some steps and not others, so
  this pins the clipping rule and the LR of every step, including warmup.
* 2 micro-steps of b reproduce 1 step of 2b at ZeRO 0 and 2 (loss divided once, LR stepped per
  optimizer step, head rows accumulated over the window), and at sample rate 0.5 too: the
  window samples its rows once for both micro-batches' labels, as the batch of 2b does.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed
from tests.trainer_helpers import assert_close_states, cfg_dict, ds_config, make_trainer, snapshot

STAGES = (0, 1, 2, 3)
STEPS = 5
BATCH = 4  # per rank at W=2; W=1 uses 2 * BATCH
CLIP = 4.0  # binds on 4 of the 5 steps (asserted in test_w1_matches_plain_torch)
WARMUP_EPOCHS = 2 / 64  # 512 images / 8 per step = 64 steps per epoch -> 2 warmup steps


def _cfg(batch: int, accum: int = 1, rate: float = 1.0) -> dict:
    return cfg_dict(
        train={"batch_size": batch, "grad_accum": accum, "max_steps": STEPS},
        optim={"warmup_epochs": WARMUP_EPOCHS},
        head={"sample_rate": rate},
    )


def _run(cfg: dict, stage: int, output: str) -> dict:
    trainer = make_trainer(cfg, ds_config(stage, gradient_clipping=CLIP), output)
    trainer.fit()
    snap = snapshot(trainer)
    snap["global_steps"] = trainer.engine.global_steps
    snap["engine_lr"] = trainer.engine.get_lr()[0]
    return snap


def _plain_torch(cfg: dict) -> dict:
    """The same training written directly in torch, no DeepSpeed and no trainer code."""
    import pfc_ds
    from pfc_ds.backbones import get_backbone
    from pfc_ds.train.config import Config
    from pfc_ds.train.schedule import PolynomialLRWarmup
    from pfc_ds.train.synthetic import SyntheticFaces

    c = Config.from_dict(cfg)
    torch.manual_seed(c.train.seed)
    net = get_backbone("tiny", c.model.embedding_size, **c.model.options)
    head = pfc_ds.PartialFC(
        pfc_ds.CombinedMarginLoss(c.head.scale, *c.head.margin),
        c.model.embedding_size,
        c.data.num_classes,
        sample_rate=1.0,
        seed=c.train.seed,
    )
    o = c.optim
    opt = torch.optim.SGD(
        net.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
    )
    hopt = pfc_ds.SparseSGD(head, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    loader = SyntheticFaces(
        num_classes=c.data.num_classes,
        num_images=c.data.num_images,
        image_size=c.data.image_size,
        batch_size=c.train.batch_size,
        seed=c.data.seed,
    )
    sched = PolynomialLRWarmup(2, STEPS)
    losses, norms = [], []
    for k, (x, y) in zip(range(STEPS), loader, strict=False):
        loss = head(net(x), y)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)))
        for g in opt.param_groups:
            g["lr"] = o.lr * sched.factor(k)
        hopt.param_groups[0]["lr"] = o.lr * sched.factor(k)
        opt.step()
        opt.zero_grad()
        assert hopt.step()
        hopt.zero_grad()
        losses.append(float(loss))
    backbone = {k: v.detach().clone() for k, v in net.state_dict().items()}
    full = head.state_dict()
    return {
        "losses": losses,
        "norms": norms,
        "backbone": backbone,
        "head": {"weight": full["weight"], "momentum": full["momentum"]},
    }


def _worker(rank: int, world: int, tmp: str) -> dict:
    out: dict = {}
    batch = BATCH * (2 // world)
    for stage in STAGES:
        out[stage] = _run(_cfg(batch), stage, f"{tmp}/w{world}_z{stage}")
    if world == 1:
        out["plain"] = _plain_torch(_cfg(batch))
        for stage in (0, 2):
            out[f"accum{stage}"] = _run(_cfg(BATCH, accum=2), stage, f"{tmp}/accum_z{stage}")
        # Sampled rows: the window of 2 micro-batches samples once, as the batch of 2b does.
        out["sampled"] = _run(_cfg(batch, rate=0.5), 0, f"{tmp}/sampled")
        out["sampled_accum"] = _run(_cfg(BATCH, 2, 0.5), 0, f"{tmp}/sampled_accum")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("equivalence"))
    w1 = run_distributed(_worker, 1, tmp)[0]
    w2 = run_distributed(_worker, 2, tmp)
    return w1, w2


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_world_size_equivalence(runs, stage):
    w1, w2 = runs
    assert_close_states(w2[0][stage], w1[stage], 1e-4, f"ZeRO-{stage} W=2 vs W=1")
    # Both ranks hold the same backbone and report the same global loss.
    assert_close_states(w2[1][stage], w2[0][stage], 1e-7, f"ZeRO-{stage} rank 1 vs rank 0")


@pytest.mark.slow
def test_w1_matches_plain_torch(runs):
    w1, _ = runs
    plain = w1["plain"]
    norms = plain["norms"]
    assert any(n > CLIP for n in norms) and any(n < CLIP for n in norms), norms
    assert_close_states(w1[0], plain, 1e-5, "DeepSpeed ZeRO-0 vs plain torch")
    # The LR of each optimizer step: 2 warmup steps then linear decay to 0 over 5 steps.
    lr = 0.2
    want = [lr * 0.5, lr, lr, lr * 2 / 3, lr / 3]
    assert w1[0]["lrs"] == pytest.approx(want)


@pytest.mark.slow
@pytest.mark.parametrize("stage", (0, 2))
def test_gradient_accumulation(runs, stage):
    w1, _ = runs
    acc = w1[f"accum{stage}"]
    assert_close_states(acc, w1[stage], 1e-4, f"ZeRO-{stage} 2 x b vs 1 x 2b")
    # One LR step and one DeepSpeed step per optimizer step, not per micro-batch.
    assert acc["global_steps"] == STEPS
    assert acc["lrs"] == pytest.approx(w1[stage]["lrs"])
    assert acc["engine_lr"] == pytest.approx(w1[stage]["lrs"][-1])


@pytest.mark.slow
def test_gradient_accumulation_with_sampled_rows(runs):
    w1, _ = runs
    assert_close_states(w1["sampled_accum"], w1["sampled"], 1e-4, "r=0.5: 2 x b vs 1 x 2b")
